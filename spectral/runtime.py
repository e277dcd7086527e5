"""The runnable side of one checkpoint, built once and shared by every session that opens it.

A `ModelRuntime` owns what what-ifs need beyond the spectra (which its `Workspace` owns): the runnable model or the
reason it cannot run, the hyperparameters the weights do not fix (asked of the user, never guessed), one `Evaluator`
per evaluation text (the untouched model's outputs, computed once), and the lock that keeps sessions' forward
passes apart. Settings are arguments of the calls that need them; nothing here is set per session.

`with_hyperparameters(values)` rebuilds the model with the user's answers and discards everything built from the
old one; `generation` counts those rebuilds, so per-session objects made from an older model can tell they are stale.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from models.contract import Need, NotRunnable, Runnable
from models.registry import runnable_model
from spectral.devices import CPU, Device
from spectral.evaluation import DEFAULT_POSITIONS, EvalBatch, Evaluator, make_eval_batch
from spectral.heap import release_freed_memory
from spectral.workspace import Workspace

MAX_EVALUATORS = 4  # evaluation texts whose reference outputs are kept per checkpoint (least recently used go)


def text_key(text: str | None) -> str:
    """Names an evaluation text in caches: "" for the model's default batch, else a digest of the text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] if text else ""


@dataclass(frozen=True)
class BatchSpec:
    """What an evaluation batch is made from: the user's text (None: the model's default), size and seed."""

    text: str | None = None
    positions: int = DEFAULT_POSITIONS
    seed: int = 0

    @property
    def key(self) -> tuple:
        return (text_key(self.text), self.positions, self.seed)


class ModelRuntime:
    """The runnable model of one checkpoint (or why not), its evaluators per evaluation text, and the forward lock.

    Thread-safe; shared by every session on the same checkpoint content. `runnable` may be given (a model built
    elsewhere, e.g. with a custom config in a test); otherwise it is built on first use by `models.registry`."""

    def __init__(self, workspace: Workspace, runnable: Runnable | None = None,
                 hyperparameters: Mapping[str, float | int] | None = None, device: Device = CPU):
        self.workspace = workspace
        self.hyperparameters: dict = dict(hyperparameters or {})
        self.device = device  # where the model, its evaluation batches and the cut matrices live
        self.lock = threading.RLock()  # held for every forward pass on the shared model (and each prefetched matrix)
        self.generation = 0
        self._prefetch: threading.Thread | None = None
        self._prefetch_done = self._prefetch_total = 0
        self._prefetch_stop = threading.Event()
        self._build_lock = threading.Lock()
        self._built = runnable is not None
        self._runnable = runnable
        self._why_not: str | None = None
        self._needs: tuple[Need, ...] = ()
        self._evaluators: OrderedDict[tuple, Evaluator] = OrderedDict()
        self._reference_points: weakref.WeakKeyDictionary[Evaluator, dict] = weakref.WeakKeyDictionary()

    @classmethod
    def open(cls, source, *, hyperparameters: Mapping | None = None, mapper=None,
             device: Device = CPU) -> ModelRuntime:
        """A runtime for a `Workspace`, a `Checkpoint`, a path or "demo"; `mapper` (a RayMap) computes the spectra,
        `device` holds the model and computes local spectra."""
        return cls(Workspace.open(source, mapper=mapper, device=device), hyperparameters=hyperparameters,
                   device=device)

    # ------------------------------------------------------------------------------------------------ the model

    def _build(self) -> None:
        with self._build_lock:
            if self._built:
                return
            try:
                self._runnable = self._placed(runnable_model(self.workspace.checkpoint,
                                                             config_overrides=self.hyperparameters or None))
            except NotRunnable as exc:
                self._why_not, self._needs = exc.reason, exc.needs
            except Exception as exc:  # noqa: BLE001 - an adapter failure is one line, never a crash of the caller
                self._why_not = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            self._built = True

    @property
    def runnable(self) -> Runnable | None:
        """The runnable model, or None when this checkpoint cannot run (`why_not` says why)."""
        self._build()
        return self._runnable

    @property
    def why_not(self) -> str | None:
        """One line on why there is no forward pass; None when the model runs."""
        self._build()
        return None if self._runnable is not None else self._why_not

    @property
    def needs(self) -> tuple[Need, ...]:
        """Hyperparameters that would make the model runnable if the user gave them (empty when it runs)."""
        self._build()
        return () if self._runnable is not None else self._needs

    @property
    def kind(self) -> str | None:
        """"causal_lm", "encoder", ... or None without a forward pass."""
        runnable = self.runnable
        return None if runnable is None else runnable.kind

    def _placed(self, runnable: Runnable) -> Runnable:
        """The runnable with its module on this runtime's device (the CPU leaves it as built)."""
        if self.device != CPU:
            runnable.module.to(self.device.torch_device)
        return runnable

    def require(self) -> Runnable:
        """The runnable model, or `NotRunnable` with the reason."""
        runnable = self.runnable
        if runnable is None:
            raise NotRunnable(self.workspace.checkpoint.source, self._why_not or "cannot be run", self._needs)
        return runnable

    def with_hyperparameters(self, values: Mapping[str, float | int]) -> None:
        """Rebuild the model with these hyperparameters; on success everything built from the old model (evaluators)
        is discarded and `generation` moves on. Raises `NotRunnable` (one line) when they do not make it run."""
        merged = {**self.hyperparameters, **values}
        try:
            runnable = self._placed(runnable_model(self.workspace.checkpoint, config_overrides=merged))
        except NotRunnable:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a head count that does not divide the width
            raise NotRunnable(self.workspace.checkpoint.source, f"{type(exc).__name__}: {exc}") from None
        with self._build_lock, self.lock:
            self.hyperparameters = merged
            self._runnable, self._why_not, self._needs, self._built = runnable, None, (), True
            self._evaluators.clear()
            self.generation += 1

    # ------------------------------------------------------------------------------------------------ evaluation

    def evaluator(self, spec: BatchSpec = BatchSpec()) -> Evaluator:
        """The untouched model's outputs on the batch `spec` describes, built once (one forward pass) and shared.

        Raises `NotRunnable` without a forward pass and `EvaluationError` when the text cannot make a batch."""
        runnable = self.require()
        key = spec.key
        with self.lock:
            found = self._evaluators.get(key)
            if found is not None and found.runnable is runnable:
                self._evaluators.move_to_end(key)
                return found
            batch = make_eval_batch(runnable, spec.text, positions=spec.positions, seed=spec.seed)
            evaluator = Evaluator(runnable, batch, lazy=True)  # the whole batch runs on first use, with progress
            self._evaluators[key] = evaluator
            while len(self._evaluators) > MAX_EVALUATORS:
                self._evaluators.popitem(last=False)
            return evaluator

    # ------------------------------------------------------------------------------------------ background work

    def start_prefetch(self, names=None) -> None:
        """Compute the truncation factors of every matrix (or `names`) in a background thread, in model order, one
        matrix at a time under the forward lock: a slider move's evaluation never shares the cores with it, and a
        move that needs a matrix not reached yet computes it at once. Idempotent; `prefetch_progress` follows it."""
        if self._prefetch is not None and (self._prefetch.is_alive() or names is None):
            return  # running, or every matrix was asked for once already
        order = [m.name for m in self.workspace.matrices] if names is None else list(names)
        order = [name for name in order if not self.workspace.has_truncation(name)]
        if not order:
            return
        self._prefetch_stop.clear()
        self._prefetch_done, self._prefetch_total = 0, len(order)

        def work() -> None:
            try:
                for i, name in enumerate(order):
                    if self._prefetch_stop.is_set():
                        return
                    with self.lock:
                        try:
                            self.workspace.truncation(name)
                        except Exception:  # noqa: BLE001 - e.g. a NaN matrix; a move that needs it reports why
                            pass
                    self._prefetch_done = i + 1
            finally:  # this thread's Gram matrices and slices, freed in its own malloc arena (spectral/heap.py)
                release_freed_memory()

        self._prefetch = threading.Thread(target=work, name="prefetch-factors", daemon=True)
        self._prefetch.start()

    @property
    def prefetch_progress(self) -> tuple[int, int]:
        """(matrices whose factors are ready, matrices to do) of the background work; (0, 0) before it starts."""
        return (self._prefetch_done, self._prefetch_total)

    @property
    def prefetching(self) -> bool:
        """The background thread is computing factors now."""
        return self._prefetch is not None and self._prefetch.is_alive()

    def stop_prefetch(self, wait: bool = False) -> None:
        """Stop after the matrix in hand (and wait for that with `wait`)."""
        self._prefetch_stop.set()
        if wait and self._prefetch is not None:
            self._prefetch.join()

    def reference_points(self, evaluator: Evaluator) -> dict:
        """The reference strategies' chart points computed on `evaluator`, by (scope, settings): one dict shared by
        every session on it, gone with the evaluator (`WhatIfSession.reference` fills it)."""
        with self.lock:
            return self._reference_points.setdefault(evaluator, {})

    def evaluator_for(self, batch: EvalBatch) -> Evaluator:
        """An evaluator on a batch made elsewhere (a calibration split, a notebook's tokens); not cached."""
        runnable = self.require()
        with self.lock:
            return Evaluator(runnable, batch)
