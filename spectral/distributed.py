"""The per-matrix spectra map on a Ray cluster: each (checkpoint, matrix) spectrum is a task (DESIGN.md, "Beyond one
machine"). Ray is optional: `pip install "ray[default]"`.

Where the workers can see the checkpoint's files (one machine, or a shared filesystem as on most HPC clusters) a task
opens the file that holds its tensor itself, memory-mapped, reads only that tensor, and keeps the opened file in a
per-worker cache; an upload's bytes go through Ray's object store once, and the tensors of anything else (files the
workers cannot see, multi-file uploads) one by one. Every task runs the local run's float64 route on the same
matrix view, so results equal the local run's, field for field. Ray retries a task whose worker died; a matrix
that fails (an unreadable tensor) comes back as a one-line reason and the rest complete.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Self

import torch

from spectral.analysis import Progress, Spectrum
from spectral.checkpoint import (
    WEIGHT_SUFFIXES,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_checkpoint_bytes,
)
from spectral.devices import CPU, DEVICES, Device, DeviceError, resolve_device, singular_values_on
from spectral.matrices import MatrixInfo, find_matrices, matrix_view
from spectral.nulls import DEFAULT_SHUFFLES, NULLS
from spectral.threads import configure_threads
from spectral.workspace import NonFiniteMatrix, matrix_spectrum, null_spectrum

RAY_MISSING = 'the Ray cluster map needs Ray, which is not installed: pip install "ray[default]"'
TASK_RETRIES = 3  # Ray re-runs a task this many times when its worker dies (a killed process, a lost node)
TASK_COST = 3e8  # small matrices share a task until their m·n·min(m, n) sums to this (~20 ms on one core)
OPENED_PER_WORKER = 16  # checkpoint files a worker keeps open (memory-mapped headers, no tensor data)
TASK_NAME = "spectral.distributed._run_task"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray gives this machine's nodes 127.0.0.1 (read at import)

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Result = Spectrum | Factors | str  # a str is the reason the matrix was skipped or failed


class DistributedError(Exception):
    """The cluster cannot be used (Ray missing, no address, unreachable); `str(error)` is one line."""


def import_ray(local: bool = False):
    """Ray, imported on first use (it is optional). Before its first import in a process, a throwaway local cluster
    is kept on the loopback interface: Ray otherwise gives even a one-machine cluster the machine's network address."""
    if local and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    try:
        import ray
    except ImportError:
        raise DistributedError(RAY_MISSING) from None
    return ray


def resolve_address(address: str | None) -> str:
    """The cluster to use: `address`, else the RAY_ADDRESS environment variable; "local" starts a throwaway one."""
    chosen = (address or os.environ.get("RAY_ADDRESS", "")).strip()
    if not chosen:
        raise DistributedError("no Ray cluster given: pass --ray ADDRESS (host:port, ray://host:10001, or 'local' "
                               "for a throwaway cluster on this machine) or set RAY_ADDRESS")
    return chosen


@dataclass(frozen=True)
class Job:
    """One checkpoint of a map: which matrices (default: all) and, for an upload held in memory, its bytes."""

    checkpoint: Checkpoint
    infos: tuple[MatrixInfo, ...] | None = None
    upload: bytes | None = None  # the uploaded single file's bytes: one ray.put, workers open it from the store
    given: tuple[Spectrum, ...] = ()  # spectra already computed, to which a task only adds the null


@dataclass(frozen=True)
class Work:
    """What a task makes of each matrix: its spectrum with `null` added (spectral.nulls; "mp" adds nothing), or
    its SVD factors."""

    factors: bool = False
    null: str = "mp"

    @property
    def weight(self) -> float:
        """Cost of the work relative to one spectrum, for ordering and batching (a permutation null is
        DEFAULT_SHUFFLES more spectra; biwhitening is a Sinkhorn scaling and a spectrum)."""
        return {"mp": 1.0, "biwhitened": 2.0, "permutation": 1.0 + DEFAULT_SHUFFLES}[self.null]


@dataclass(frozen=True)
class FileStamp:
    """A file as the driver saw it; a worker refuses to read it if its size or modification time differ."""

    path: str  # absolute
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileStamp:
        st = os.stat(path)
        return cls(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class _Upload:
    data: object  # ObjectRef of the file's bytes; inside a dataclass, so Ray hands tasks the reference, not the bytes
    filename: str
    sha256: str


@dataclass(frozen=True)
class _Task:
    """Some matrices of one checkpoint, read from one place: a file, an upload, or tensors passed as arguments."""

    job: int
    infos: tuple[MatrixInfo, ...]
    sha256: str
    work: Work
    given: tuple[Spectrum | None, ...]  # per matrix: its spectrum when already computed
    file: FileStamp | None = None
    upload: _Upload | None = None

    @property
    def cost(self) -> float:
        return sum(_cost(info) for info in self.infos) * self.work.weight


class RayMap:
    """The per-matrix map on a Ray cluster; `spectra` and `factors` return what the local workspace would compute.

    address: host:port or ray://host:port of an existing cluster, "local" for a throwaway cluster on this machine
    (`workers` processes), or None for RAY_ADDRESS. Each task takes `threads_per_task` cores (torch's intra-op
    pool); `device` is cpu, cuda or auto (cuda when the cluster has GPUs); with `shared_filesystem=False` tensors
    travel through the object store even when the driver sees the files. A local cluster runs Ray's dashboard (and
    so its state API, `busy_workers`) only when `dashboard` is true, and then best-effort: a dashboard that does not
    come up within Ray's start-up timeout is logged and the cluster runs without it (CI saw one take over 60 s on a
    loaded 2-core machine); nothing but `busy_workers` needs it, and our own progress reports the work."""

    def __init__(self, address: str | None = None, *, workers: int | None = None, threads_per_task: int = 1,
                 device: str = "cpu", shared_filesystem: bool = True, dashboard: bool = False):
        if device not in DEVICES:
            raise DeviceError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
        self.address = resolve_address(address)
        self._ray = ray = import_ray(local=self.address == "local")
        self.threads_per_task = max(1, int(threads_per_task))
        self.shared_filesystem = shared_filesystem
        self._owns_connection = False
        if not ray.is_initialized():
            options = {"log_to_driver": False, "logging_level": logging.WARNING}
            try:
                if self.address == "local":
                    cores = workers or len(os.sched_getaffinity(0))
                    # include_dashboard=None: Ray's "if it can", whose failure is not fatal; False still starts
                    # Ray's minimal API server, equally non-fatal
                    ray.init(address="local", num_cpus=cores * self.threads_per_task,
                             include_dashboard=None if dashboard else False,
                             dashboard_host="127.0.0.1", dashboard_port=_free_port() if dashboard else None,
                             **options)
                else:
                    _check_reachable(self.address)
                    ray.init(address=self.address, **options)
            except Exception as e:  # noqa: BLE001 - any failure to reach the cluster is one line for the user
                hint = ""
                if self.address != "local" and "RAY_AUTH_MODE" not in os.environ and not isinstance(e, ConnectionError):  # Ray enables no token by itself
                    hint = ("; a cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token and its "
                            "token (`ray get-auth-token`) in this environment")
                raise DistributedError(f"cannot use the Ray cluster at {self.address}: {_first_line(e)}{hint}") from None
            self._owns_connection = True
        gpus = ray.cluster_resources().get("GPU", 0)
        if device == "cuda" and gpus == 0:
            raise DeviceError("--device cuda: the Ray cluster has no GPUs; use --device cpu or --device auto")
        self.device = "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"
        resources = {"num_cpus": self.threads_per_task, "num_gpus": 1 if self.device == "cuda" else 0}
        self._remote = ray.remote(_run_task).options(name=TASK_NAME, max_retries=TASK_RETRIES, retry_exceptions=False,
                                                     **resources)
        # a worker's first task imports torch and this package (seconds): start that on every slot now, unawaited,
        # so it overlaps the driver opening (hashing) the checkpoints
        slots = int(ray.cluster_resources().get("GPU" if self.device == "cuda" else "CPU", 1) //
                    max(1, resources["num_gpus"] or self.threads_per_task))
        self._warming = [ray.remote(_warm_worker).options(**resources).remote() for _ in range(max(1, slots))]

    # ------------------------------------------------------------------------------------------------ public calls

    def spectra(self, checkpoint: Checkpoint, infos: Sequence[MatrixInfo] | None = None,
                progress: Progress | None = None, *, upload: bytes | None = None, null: str = "mp"
                ) -> dict[str, Spectrum | str]:
        """Each matrix's spectrum (default: all of the checkpoint's) with `null` added, or the reason it has none."""
        return self.spectra_many([Job(checkpoint, _tuple(infos), upload)], progress, null=null)[0]

    def spectra_many(self, jobs: Iterable[Job | Checkpoint], progress: Progress | None = None, *, null: str = "mp"
                     ) -> list[dict[str, Spectrum | str]]:
        """One map over checkpoint × matrix for several checkpoints (a folder of them, a training run), in order.

        `jobs` may be a generator that opens each checkpoint: it is drawn from while the workers are busy, so opening
        (hashing) the next checkpoint overlaps the spectra of the previous ones; progress totals grow as it does."""
        _check_null(null)
        return self._map((job if isinstance(job, Job) else Job(job) for job in jobs), Work(null=null), progress)

    def null_spectra(self, checkpoint: Checkpoint, spectra: Iterable[Spectrum], null: str,
                     progress: Progress | None = None, *, upload: bytes | None = None) -> dict[str, Spectrum | str]:
        """`spectra` (computed before, here or locally) with `null` added, as `Workspace.null_spectra` does."""
        _check_null(null)
        given = tuple(spectra)
        by_name = {info.name: info for info in find_matrices(checkpoint)}
        job = Job(checkpoint, tuple(by_name[sp.name] for sp in given), upload, given)
        return self._map([job], Work(null=null), progress)[0]

    def factors(self, checkpoint: Checkpoint, infos: Sequence[MatrixInfo] | None = None,
                progress: Progress | None = None, *, upload: bytes | None = None) -> dict[str, Factors | str]:
        """Economy SVD factors (U, S, Vh) in float32 of each matrix, as `Workspace.factors` computes them."""
        return self._map([Job(checkpoint, _tuple(infos), upload)], Work(factors=True), progress)[0]

    def describe(self) -> str:
        """One line for the CLI and the Overview card: where the work goes."""
        resources = self._ray.cluster_resources()
        nodes = sum(1 for node in self._ray.nodes() if node.get("Alive"))
        gpus = f", {int(resources.get('GPU', 0))} GPUs" if resources.get("GPU") else ""
        return (f"Ray cluster {self.address}: {int(resources.get('CPU', 0))} CPUs{gpus} on {nodes} node"
                f"{'s' if nodes != 1 else ''}, {self.threads_per_task} thread(s) per task, device {self.device}")

    def busy_workers(self) -> list[int]:
        """Process ids of the workers now running a spectra task (Ray's state API; needs the cluster's dashboard)."""
        from ray.util.state import list_tasks  # part of ray[default]; imported here so that plain ray still works
        try:
            tasks = list_tasks(filters=[("state", "=", "RUNNING"), ("name", "=", TASK_NAME)], raise_on_missing_output=False)
        except Exception as e:  # noqa: BLE001
            raise DistributedError(f"Ray's state API is unavailable ({_first_line(e)}); start the cluster with its "
                                   "dashboard") from None
        return sorted({t.worker_pid for t in tasks if t.worker_pid})

    def wait_until_warm(self) -> None:
        """Block until the workers started at construction have imported what a task needs (benchmarks, tests)."""
        self._ray.get(self._warming)

    def close(self) -> None:
        """Disconnect; a cluster started with address "local" stops with it."""
        if self._owns_connection and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_connection = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- the map

    def _map(self, jobs: Iterable[Job], work: Work, progress: Progress | None) -> list[dict[str, Result]]:
        """Tasks largest first; the next checkpoint is opened (hashed, parsed) while the workers are busy."""
        ray = self._ray
        window = max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))  # bounds tensors held in the object store
        upcoming = iter(jobs)
        opened: list[Job] = []
        infos: list[tuple[MatrixInfo, ...]] = []
        results: list[dict[str, Result]] = []
        pending: list[_Task] = []
        running: dict = {}
        total = done = 0
        more = True
        try:
            while True:
                while more and len(pending) + len(running) < window:
                    job = next(upcoming, None)
                    if job is None:
                        more = False
                        break
                    opened.append(job)
                    infos.append(job.infos if job.infos is not None else tuple(find_matrices(job.checkpoint)))
                    results.append({})
                    pending += self._plan(len(opened) - 1, job, infos[-1], work)
                    pending.sort(key=lambda task: -task.cost)  # largest first: a greedy schedule's makespan is near best
                    total += len(infos[-1])
                while pending and len(running) < window:
                    task = pending.pop(0)
                    submitted = self._submit(task, opened[task.job].checkpoint, results[task.job])
                    if submitted is not None:
                        running[submitted[0]] = submitted[1]
                    done += len(task.infos) - (len(submitted[1].infos) if submitted else 0)
                if not running:
                    if not more and not pending:
                        break
                    continue
                ready, _ = ray.wait(list(running), num_returns=1)
                task = running.pop(ready[0])
                try:
                    answers = ray.get(ready[0])
                except ray.exceptions.RayError as e:  # every retry used up, or the task could not run at all
                    answers = [(info.name, f"failed on the cluster: {_first_line(e)}") for info in task.infos]
                results[task.job].update(answers)
                done += len(task.infos)
                if progress:
                    progress(done, total, task.infos[-1].name)
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
        if progress and total:
            progress(total, total, "")
        return [{info.name: _scrubbed(found[info.name], job.checkpoint.root) for info in job_infos if info.name in found}
                for job, job_infos, found in zip(opened, infos, results)]

    def _submit(self, task: _Task, checkpoint: Checkpoint, results: dict[str, Result]) -> tuple | None:
        """(object ref, task) of the submitted task; a task whose tensors travel reads them now, one ray.put each,
        and leaves out those it cannot read (their reason goes straight to `results`); None if none is left."""
        refs = []
        if task.file is None and task.upload is None:
            kept = []
            for info in task.infos:
                try:
                    refs.append(self._ray.put(checkpoint.tensor(info.name)))
                    kept.append(info)
                except (CheckpointError, KeyError, OSError) as e:
                    results[info.name] = f"cannot read tensor: {_first_line(e)}"
            if not kept:
                return None
            task = replace(task, infos=tuple(kept), given=tuple(task.given[task.infos.index(i)] for i in kept))
        return self._remote.remote(task, self.device, self.threads_per_task, *refs), task

    def _plan(self, j: int, job: Job, infos: tuple[MatrixInfo, ...], work: Work) -> list[_Task]:
        """The tasks of one checkpoint: matrices grouped by where a worker reads them, small ones batched."""
        ck = job.checkpoint
        given = {sp.name: sp for sp in job.given}

        def task(batch: tuple[MatrixInfo, ...], **where) -> _Task:
            return _Task(j, batch, ck.sha256, work, tuple(given.get(info.name) for info in batch), **where)

        if job.upload is not None:
            upload = _Upload(self._ray.put(bytes(job.upload)), Path(ck.source).name, ck.sha256)
            return [task(batch, upload=upload) for batch in _batches(infos, work.weight)]
        files = _tensor_files(ck) if self.shared_filesystem else None
        if files is None:  # the tensors themselves travel, read when their task is submitted
            return [task(batch) for batch in _batches(infos, work.weight)]
        by_file: dict[FileStamp, list[MatrixInfo]] = {}
        for info in infos:
            by_file.setdefault(files[info.name], []).append(info)
        return [task(batch, file=stamp) for stamp, group in by_file.items() for batch in _batches(group, work.weight)]


# ------------------------------------------------------------------------------------------------- on the worker

_opened: OrderedDict[tuple, Checkpoint] = OrderedDict()
_opened_lock = threading.Lock()


def _run_task(task: _Task, device: str, threads: int, *tensors: torch.Tensor) -> list[tuple[str, Result]]:
    """Runs on a worker: each matrix of the task, each failure caught and reported for its matrix alone."""
    configure_threads(threads)
    answers: list[tuple[str, Result]] = []
    try:
        where = resolve_device(device)
        checkpoint = _worker_checkpoint(task) if not tensors else None
    except (CheckpointError, DeviceError, OSError) as e:
        return [(info.name, f"cannot read tensor: {_first_line(e)}") for info in task.infos]
    for i, info in enumerate(task.infos):
        try:
            tensor = tensors[i] if tensors else checkpoint.tensor(info.name)
            matrix = matrix_view(tensor, info)
            if task.work.factors:
                answers.append((info.name, _factors(matrix)))
                continue
            spectrum = task.given[i] if task.given[i] is not None else _matrix_spectrum(matrix, info, where)
            if not isinstance(spectrum, str) and task.work.null != "mp":
                spectrum = null_spectrum(spectrum, matrix, task.work.null)
            answers.append((info.name, spectrum))
        except (CheckpointError, KeyError, OSError, ValueError) as e:
            answers.append((info.name, f"cannot read tensor: {_first_line(e)}"))
        except Exception as e:  # noqa: BLE001 - one matrix's failure (out of memory, ...) must not lose the others
            answers.append((info.name, f"failed: {type(e).__name__}: {_first_line(e)}"))
    return answers


def _warm_worker() -> int:
    """Nothing but the imports that loading this function brought (torch, spectral); the worker's pid."""
    return os.getpid()


def _worker_checkpoint(task: _Task) -> Checkpoint:
    """The task's checkpoint, opened once per worker: a file it can see, or an upload from the object store."""
    key = (task.file.path, task.file.size, task.file.mtime_ns) if task.file else ("upload", task.upload.sha256)
    with _opened_lock:
        if key in _opened:
            _opened.move_to_end(key)
            return _opened[key]
    if task.file is not None:
        checkpoint = _open_file(task.file, task.sha256)
    else:
        data = import_ray().get(task.upload.data)
        checkpoint = load_checkpoint_bytes(data, task.upload.filename)
    with _opened_lock:
        _opened[key] = checkpoint
        while len(_opened) > OPENED_PER_WORKER:
            _opened.popitem(last=False)
    return checkpoint


def _open_file(stamp: FileStamp, sha256: str) -> Checkpoint:
    if not os.path.exists(stamp.path):
        raise CheckpointError(stamp.path, f"not visible on worker node {socket.gethostname()}: the cluster needs a "
                                          "shared filesystem, or send the tensors through the object store")
    # the driver hashed the content already; a shard of a folder is keyed by the folder's digest (never compared)
    checkpoint = load_checkpoint(stamp.path, known_sha256=sha256)
    seen = FileStamp.of(stamp.path)
    if (seen.size, seen.mtime_ns) != (stamp.size, stamp.mtime_ns):
        raise CheckpointError(stamp.path, "changed on disk since the driver opened it (size or modification time "
                                          "differ); open it again")
    return checkpoint


def _matrix_spectrum(matrix: torch.Tensor, info: MatrixInfo, device: Device) -> Spectrum | str:
    """The local run's per-matrix step (`spectral.workspace.matrix_spectrum`), or the reason a NaN/Inf matrix has none;
    on the CPU exactly the local route, elsewhere the device's singular values."""
    try:
        return matrix_spectrum(matrix, info, svd=None if device == CPU else partial(singular_values_on, device=device))
    except NonFiniteMatrix as e:
        return str(e)


def _factors(matrix: torch.Tensor) -> Factors:
    """`Workspace.factors`: the float64 economy SVD, kept in float32."""
    U, S, Vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return U.float().contiguous(), S.float(), Vh.float().contiguous()


# ------------------------------------------------------------------------------------------------------ helpers

def _tensor_files(checkpoint: Checkpoint) -> dict[str, FileStamp] | None:
    """Tensor name -> the file on disk that holds it, or None when the checkpoint is not (all) on this disk.

    One file holds everything; a Hugging Face folder's index (validated by the loader) says which shard holds what."""
    paths = [Path(f) for f in checkpoint.files]
    if not paths or not all(p.is_file() for p in paths):
        return None
    if len(paths) == 1:
        stamp = FileStamp.of(paths[0])
        return {name: stamp for name in checkpoint.names()}
    index = [p for p in paths if p.name.endswith(".index.json")]
    if len(index) == 1:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        stamps = {shard: FileStamp.of(index[0].parent / shard) for shard in set(weight_map.values())}
        return {name: stamps[shard] for name, shard in weight_map.items()}
    weights = [p for p in paths if p.name.lower().endswith(WEIGHT_SUFFIXES)]
    if len(weights) == 1:
        stamp = FileStamp.of(weights[0])
        return {name: stamp for name in checkpoint.names()}
    return None


def _check_null(null: str) -> None:
    if null not in NULLS:
        raise ValueError(f"unknown null {null!r}; choose one of {', '.join(NULLS)}")


def _scrubbed(result: Result, root: str | None) -> Result:
    """A failure reason of a checkpoint from the server folder names its files relative to it, never the server's
    own paths (as spectral.checkpoint's messages do)."""
    if isinstance(result, str) and root:
        return result.replace(root.rstrip("/") + "/", "").replace(root, ".")
    return result


def _batches(infos: Sequence[MatrixInfo], weight: float = 1.0) -> list[tuple[MatrixInfo, ...]]:
    """Matrices grouped into tasks: each large one alone, small ones together until their cost reaches TASK_COST."""
    batches, current, cost = [], [], 0.0
    for info in sorted(infos, key=_cost, reverse=True):
        current.append(info)
        cost += _cost(info) * weight
        if cost >= TASK_COST:
            batches.append(tuple(current))
            current, cost = [], 0.0
    if current:
        batches.append(tuple(current))
    return batches


def _cost(info: MatrixInfo) -> float:
    """m·n·min(m, n): the flops of the Gram product, which dominate the per-matrix time (bench/bench_scale.py)."""
    rows, cols = info.shape
    return float(rows) * cols * min(rows, cols)


def _tuple(infos: Sequence[MatrixInfo] | None) -> tuple[MatrixInfo, ...] | None:
    return None if infos is None else tuple(infos)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at a host:port address (ray.init retries the GCS for a
    long time); ray:// client addresses and "auto" are left to Ray."""
    if "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        raise ConnectionError(f"nothing answers at {address} ({e.strerror or e})") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else type(error).__name__
