"""Research views (issue 7): the five studies of ../shared/papers reproduced on any loaded model, plus one beyond them.

| module          | study / question                                                     | needs a forward pass |
|-----------------|----------------------------------------------------------------------|----------------------|
| `truths`        | PhotonicGPT "two truths": MP signal % vs energy utilisation per role | for the measured KL  |
| `tying`         | weight-tying amplification: cut one use of a tied matrix at a time   | yes                  |
| `thresholds`    | 2512.12911: Ave_w(φ) and ŝ as the TW confidence slides, BEMA vs GB  | for the measured KL  |
| `deciles`       | Staats et al.: remove one decile of singular values per matrix type  | yes                  |
| `overlap`       | Staats et al.: O_k of right singular vectors with activation PCs     | yes (activations)    |
| `redundancy`    | crystallization: replace a matrix by rank-1 / random / zeros         | for the measured KL  |
| `whitened`      | SVD-LLM/ASVD: activation-whitened SVD against plain SVD              | yes                  |

This module holds what the views share: `ResearchContext` (a workspace, the runnable model, the fixed evaluation batch
and a what-if pruner), comparisons of a modified model's outputs with the untouched model's (`Outcome`), per-use
forward passes for tied matrices, and input-activation second moments collected with forward hooks.

Every view is a function `view(context, ...) -> <View>Result` whose `to_dict()` is the JSON the CLI writes. Nothing
here mutates the checkpoint's tensors or the runnable's module (hooks are removed before a call returns); a context is
not thread-safe (the dashboard serialises calls with the checkpoint's forward lock).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from spectral.analysis import Settings
from spectral.evaluation import (
    DEFAULT_POSITIONS,
    DEFAULT_SEQUENCE,
    EvalBatch,
    EvaluationError,
    Evaluator,
    WhatIf,
    embedding_metrics,
    kl_agreement,
    make_eval_batch,
    sample_batch,
    windows,
)
from spectral.pruning import Plan

Progress = Callable[[int, int, str], None]

__all__ = [
    "ActivationMoments",
    "NeedsForward",
    "Outcome",
    "ResearchContext",
    "ResearchError",
    "blas_single_thread",
    "calibration_split",
    "collect_input_moments",
    "encode_all",
    "jsonable",
    "pearson",
]


class ResearchError(ValueError):
    """A research view cannot run with these inputs; the message says why and what to do."""


class NeedsForward(ResearchError):
    """The view needs a forward pass and this checkpoint cannot be run (the CLI exits 3, like `prune`).
    `str(error)` is one line: "<source>: <problem>"."""

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


def _json(v):
    """A JSON-safe scalar: numpy numbers become Python numbers, non-finite floats become None."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    return v


@contextmanager
def blas_single_thread():
    """numpy's BLAS on one thread for the block (spectral/__init__.py intends that, but its environment variable is
    too late when numpy was imported first, as under Streamlit). An eigh of 384×384 was measured 5× slower with two
    BLAS threads on a busy 2-core machine. Uses threadpoolctl when installed, else does nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def encode_all(tokenizer, text: str) -> list[int]:
    """Token ids of the whole text: a tokenizer.json that truncates (Hugging Face sentence models ship max_length
    128) is copied without truncation and padding first; the shared tokenizer is not modified."""
    if getattr(tokenizer, "truncation", None) or getattr(tokenizer, "padding", None):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    return tokenizer.encode(text).ids


def jsonable(obj):
    """`obj` with numpy scalars and arrays made plain and non-finite floats made None, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    return _json(obj)


def pearson(x: Iterable[float | None], y: Iterable[float | None]) -> float | None:
    """Pearson correlation over the pairs where both are finite; None with fewer than 3 pairs or a constant side."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]
    if len(pairs) < 3:
        return None
    a, b = np.array(pairs).T
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------------------------------------------- outcomes

@dataclass(frozen=True)
class Outcome:
    """A modified model's outputs against the untouched model's on the fixed batch (spectral/evaluation.py metrics).

    Causal LMs: `kl` (mean KL(original ‖ modified), nats per predicted position), `agreement` (top-1), perplexities
    when the batch has labels. Encoders: `cosine` and nearest-neighbour `agreement`, `kl` None."""

    agreement: float
    kl: float | None
    cosine: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    logit_error: float | None = None  # ‖Δz‖_F/‖z‖_F of the position-centred logits (only from custom forwards)

    @property
    def delta_perplexity(self) -> float | None:
        if self.perplexity_after is None or self.perplexity_before is None:
            return None
        return self.perplexity_after - self.perplexity_before

    @property
    def damage(self) -> float | None:
        """The one number the views rank by: KL for causal LMs, 1 − cosine for encoders."""
        if self.kl is not None:
            return self.kl
        return None if self.cosine is None else max(0.0, 1.0 - self.cosine)  # float noise can give cos > 1

    def to_dict(self) -> dict:
        return {"kl": _json(self.kl), "agreement": _json(self.agreement), "cosine": _json(self.cosine),
                "perplexity_after": _json(self.perplexity_after), "delta_perplexity": _json(self.delta_perplexity)}

    @classmethod
    def from_metrics(cls, m) -> Outcome:
        return cls(m.agreement, m.kl, m.cosine, m.perplexity_before, m.perplexity_after)


NO_CHANGE_LM = Outcome(agreement=1.0, kl=0.0)


# ------------------------------------------------------------------------------------------------------ the batch

def calibration_split(runnable, text: str | None = None, *, positions: int = DEFAULT_POSITIONS, seed: int = 0,
                      length: int | None = None) -> tuple[EvalBatch, EvalBatch]:
    """(calibration batch, evaluation batch) on disjoint data, so a method fitted to activations is not scored on
    the tokens it was fitted to: text (the user's, else the model's held-out text) is cut in two halves, the first
    calibrates and the second evaluates; without text both are sampled from the model with different seeds."""
    if text is None and runnable.tokenizer is not None and runnable.eval_text:
        text, source = runnable.eval_text, "bundled"
    else:
        source = "text"
    if text is not None:
        if runnable.tokenizer is None:
            raise EvaluationError("text was given but the model has no tokenizer (tokenizer.json) to read it")
        ids = torch.tensor(encode_all(runnable.tokenizer, text), dtype=torch.long)
        if runnable.vocab_size is not None and len(ids) and int(ids.max()) >= runnable.vocab_size:
            raise EvaluationError("the tokenizer produces ids beyond the model's vocabulary")
        half = len(ids) // 2
        if half < 3:
            raise EvaluationError("the text is too short to split into calibration and evaluation halves")
        size = length or min(DEFAULT_SEQUENCE, runnable.block_size)
        batches = []
        for part, what in ((ids[:half], "first half"), (ids[half:], "second half")):
            x, y = windows(part, positions, size)
            batches.append(EvalBatch(x, y, source, f"{what} of the {'held-out' if source == 'bundled' else 'given'} "
                                                   "text"))
        return batches[0], batches[1]
    calib = sample_batch(runnable, positions=positions, length=length, seed=seed + 1)
    evaluation = sample_batch(runnable, positions=positions, length=length, seed=seed)
    return calib, evaluation


# ------------------------------------------------------------------------------------------------------- context

class ResearchContext:
    """A workspace with, when the model runs, its runnable, a fixed evaluation batch and a what-if session.

    `open(source)` builds everything from a path or "demo"; the dashboard passes its shared `Evaluator` instead.
    `why_not` says why there is no forward pass (views that need one raise `ResearchError` with it)."""

    def __init__(self, workspace, runnable=None, evaluator: Evaluator | None = None, *, why_not: str | None = None,
                 settings: Settings | None = None, text: str | None = None, positions: int = DEFAULT_POSITIONS,
                 seed: int = 0):
        if evaluator is not None and runnable is None:
            runnable = evaluator.runnable
        self.workspace = workspace
        self.runnable = runnable
        self.why_not = why_not if runnable is None else None
        if runnable is None and self.why_not is None:
            self.why_not = "no runnable model was given"
        self.settings = settings or Settings()
        self.text = text
        self.positions = positions
        self.seed = seed
        self._evaluator = evaluator
        self._whatif: WhatIf | None = None
        self._reference = None
        self._split = None

    @classmethod
    def open(cls, source, *, text: str | None = None, positions: int = DEFAULT_POSITIONS, seed: int = 0,
             settings: Settings | None = None) -> ResearchContext:
        """A context for a path, "demo" or a `Workspace`; a model that cannot run gives a context without one."""
        from models.registry import NotRunnable, runnable_model
        from spectral.workspace import Workspace

        workspace = Workspace.open(source)
        try:
            runnable, why_not = runnable_model(workspace.checkpoint), None
        except NotRunnable as e:
            runnable, why_not = None, e.reason
        return cls(workspace, runnable, why_not=why_not, settings=settings, text=text, positions=positions, seed=seed)

    # --------------------------------------------------------------------------------------------- what runs

    @property
    def runs(self) -> bool:
        return self.runnable is not None

    @property
    def kind(self) -> str | None:
        return None if self.runnable is None else self.runnable.kind

    @property
    def metric(self) -> str | None:
        """"kl" for causal language models, "cosine" for encoders, None without a forward pass."""
        if self.runnable is None:
            return None
        return "kl" if self.runnable.kind == "causal_lm" else "cosine"

    def require_forward(self, view: str):
        """The runnable model, or `ResearchError` naming the view and the reason."""
        if self.runnable is None:
            raise NeedsForward(self.workspace.checkpoint.source, f"the {view} view needs a forward pass and this "
                               f"checkpoint cannot be run ({self.why_not}); `analyze` still works")
        return self.runnable

    @property
    def evaluator(self) -> Evaluator:
        """The untouched model's outputs on the fixed evaluation batch (built on first use: one forward pass)."""
        if self._evaluator is None:
            runnable = self.require_forward("requested")
            batch = make_eval_batch(runnable, self.text, positions=self.positions, seed=self.seed)
            self._evaluator = Evaluator(runnable, batch)
        return self._evaluator

    @property
    def whatif(self) -> WhatIf:
        """This context's what-if session (its own pruner; the evaluator may be shared)."""
        if self._whatif is None:
            self._whatif = WhatIf(self.workspace, self.evaluator.runnable, evaluator=self.evaluator,
                                  settings=self.settings)
        self._whatif.settings = self.settings
        return self._whatif

    def calibration(self) -> tuple[EvalBatch, Evaluator]:
        """(calibration batch, evaluator on disjoint evaluation data) for methods fitted to activations
        (`calibration_split`); built once."""
        if self._split is None:
            runnable = self.require_forward("requested")
            calib, batch = calibration_split(runnable, self.text, positions=self.positions, seed=self.seed)
            self._split = (calib, Evaluator(runnable, batch))
        return self._split

    def eval_dict(self) -> dict | None:
        """DESIGN.md's `eval` block (source, sequences, tokens) of the evaluation batch, None without a forward."""
        return None if self.runnable is None else self.evaluator.batch.to_dict()

    def header(self, view: str) -> dict:
        """The keys every view's JSON starts with."""
        return {"view": view, "checkpoint": self.workspace.checkpoint_summary(),
                "metric": self.metric, "eval": self.eval_dict() if self.runs else None,
                "perplexity_before": _json(self.evaluator.perplexity_before) if self.runs else None}

    # -------------------------------------------------------------------------------------------- evaluation

    def run_plan(self, plan: Plan) -> tuple[object, Outcome]:
        """(PruneResult, Outcome) of a plan on this context's pruner."""
        result = self.whatif.run_plan(plan)
        return result.prune, Outcome.from_metrics(result.metrics)

    def evaluate(self, overrides: Mapping[str, torch.Tensor]) -> Outcome:
        """Outcome of the model with these module parameters (canonical names) replaced; partial forward passes."""
        return Outcome.from_metrics(self.evaluator.evaluate(overrides))

    def used(self, name: str) -> bool:
        """Whether the runnable module reads matrix `name` at all (a checkpoint may carry unused tensors, e.g. a
        BERT pooler under a sentence-embedding head); True without a runnable."""
        if self.runnable is None:
            return True
        info = self.workspace.info(name)
        return bool(self.runnable.params_for([info.name, *info.tied_with]))

    def matrix_overrides(self, name: str, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """Module parameters (canonical names) -> tensors that make matrix `name` (analysed layout) equal `matrix`,
        at every use of it (tied names included)."""
        info = self.workspace.info(name)
        runnable = self.require_forward("requested")
        stored = _to_stored(matrix.to(torch.float32), info)
        out = {}
        for ref in runnable.params_for([info.name, *info.tied_with]):
            out[ref.name] = (stored.T if ref.transposed else stored).contiguous()
        return out

    def original(self, name: str) -> torch.Tensor:
        """Matrix `name` in the analysed layout, float32 (a fresh tensor; the checkpoint's is never handed out)."""
        return self.workspace.weight(name).to(torch.float32).clone()

    def _reference_stats(self):
        """Reference outputs and their softmax statistics for comparing outputs of custom forward passes."""
        if self._reference is None:
            ev = self.evaluator
            ref, _ = ev.outputs({})
            if self.runnable.kind == "encoder":
                self._reference = (ref, None, None, None)
            else:
                ref = ref.float()  # the evaluator's own tensor: no copy; probabilities are recomputed per chunk
                self._reference = (ref, torch.logsumexp(ref, dim=-1), ref.argmax(dim=-1), None)
        return self._reference

    @torch.inference_mode()
    def compare(self, outputs: torch.Tensor) -> Outcome:
        """Outcome of outputs (logits (B, T, V) or embeddings) from a custom forward over the evaluation batch."""
        ref, lse, argmax, probs = self._reference_stats()
        ev = self.evaluator
        if self.runnable.kind == "encoder":
            cosine, agreement = embedding_metrics(ref, outputs)
            return Outcome(agreement, None, cosine)
        logits = outputs.reshape(-1, outputs.shape[-1]).float()
        targets = ev.batch.targets.reshape(-1) if ev.batch.targets is not None else None
        kl_sum, agree, nll = kl_agreement(ref, lse, argmax, logits, targets, probs)
        n = logits.shape[0]
        after = None if nll is None else math.exp(nll / n)
        return Outcome(agree / n, kl_sum / n, None, ev.perplexity_before, after, relative_logit_error(ref, logits))

    # ------------------------------------------------------------------------------------------- tied matrices

    def uses(self, name: str) -> list[Use]:
        """Where the module reads matrix `name`: one `Use` per (sub)module holding its parameter, in forward order."""
        runnable = self.require_forward("requested")
        return module_uses(runnable, self.workspace.info(name))

    @torch.inference_mode()
    def forward_per_use(self, name: str, replacements: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Outputs on the evaluation batch with matrix `name` replaced separately at each use.

        `replacements`: use path (a `Use.path`) -> matrix in the analysed layout; uses not named keep the original.
        Staged models run stage by stage with each stage's own override (so the input and the output use of a tied
        matrix can differ); others go through `torch.func.functional_call(..., tie_weights=False)` with one tensor
        per alias. The module itself is never modified."""
        runnable = self.require_forward("tying")
        info = self.workspace.info(name)
        uses = {u.path: u for u in module_uses(runnable, info)}
        unknown = set(replacements) - set(uses)
        if unknown:
            raise ResearchError(f"{name} has no use {min(unknown)!r}; its uses are {', '.join(uses)}")
        ids = self.evaluator.batch.input_ids
        canonical = runnable.params_for([info.name, *info.tied_with])[0]
        per_use = {}
        for path, matrix in replacements.items():
            stored = _to_stored(matrix.to(torch.float32), info)
            per_use[path] = (stored.T if canonical.transposed else stored).contiguous()
        if runnable.stages and all(u.stage is not None for u in uses.values()):
            x = ids
            for i, stage in enumerate(runnable.stages):
                chosen = [per_use[p] for p, u in uses.items() if u.stage == i and p in per_use]
                overrides = {canonical.name: chosen[0]} if chosen else {}
                x = stage.run(overrides, x)
            return x
        from models.registry import locked_functional_call

        params = {u.alias: per_use[p] for p, u in uses.items() if p in per_use}
        out = locked_functional_call(runnable.module, params, (ids,), tie_weights=False)
        return getattr(out, "logits", out)


def relative_logit_error(reference: torch.Tensor, logits: torch.Tensor, chunk_rows: int = 1024) -> float:
    """‖Δz‖_F / ‖z‖_F with every position's logits centred over the vocabulary (softmax ignores a common shift)."""
    num = den = 0.0
    for a in range(0, reference.shape[0], chunk_rows):
        z0 = reference[a:a + chunk_rows].double()
        z = logits[a:a + chunk_rows].double()
        z0 = z0 - z0.mean(-1, keepdim=True)
        z = z - z.mean(-1, keepdim=True)
        num += float(((z - z0) ** 2).sum())
        den += float((z0**2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def _to_stored(matrix: torch.Tensor, info) -> torch.Tensor:
    """An analysed-layout matrix back in the stored layout and shape (spectral.matrices.matrix_view inverted)."""
    t = matrix.T if getattr(info, "transposed", False) else matrix
    shape = tuple(getattr(info, "source_shape", ()) or t.shape)
    return t if tuple(t.shape) == shape else t.reshape(shape)


# ---------------------------------------------------------------------------------------------------- module uses

@dataclass(frozen=True)
class Use:
    """One place the module reads a matrix: the submodule holding its parameter."""

    path: str  # submodule path ("tok_emb", "lm_head", "blocks.0.attn.c_attn")
    alias: str  # the parameter's full name under that submodule ("lm_head.weight")
    kind: str  # "lookup" (nn.Embedding: reads rows by index) or "linear" (multiplies an input activation)
    stage: int | None  # index of the runnable's stage that runs this submodule (None without stages)
    role: str  # "input" (first use in forward order), "output" (last use) or "only"

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "role": self.role}


def module_uses(runnable, info) -> list[Use]:
    """The submodules that hold the parameter of a matrix, in forward order (stage order, then registration order).

    A matrix read at two places (a tied embedding and LM head) has an "input" and an "output" use."""
    refs = runnable.params_for([info.name, *info.tied_with])
    if not refs:
        return []
    target = runnable.parameter(refs[0].name)
    found = []
    for path, sub in runnable.module.named_modules(remove_duplicate=False):
        for local, p in sub.named_parameters(recurse=False, remove_duplicate=False):
            if p is target:
                alias = f"{path}.{local}" if path else local
                kind = "lookup" if isinstance(sub, torch.nn.Embedding) else "linear"
                stage = _stage_of(runnable, path)
                found.append((path, alias, kind, stage))
    seen, unique = set(), []
    for item in found:
        if item[0] not in seen:
            seen.add(item[0])
            unique.append(item)
    unique.sort(key=lambda u: (u[3] if u[3] is not None else 0, u[2] == "linear"))
    uses = []
    for i, (path, alias, kind, stage) in enumerate(unique):
        role = "only" if len(unique) == 1 else ("input" if i == 0 else "output" if i == len(unique) - 1 else "middle")
        uses.append(Use(path, alias, kind, stage, role))
    return uses


def _stage_of(runnable, path: str) -> int | None:
    """Which stage runs submodule `path`: the stage named by a prefix of it, or, for the standard GPT stages, the
    embedding/head stages by the parameters they read."""
    if not runnable.stages:
        return None
    for i, stage in enumerate(runnable.stages):
        if path == stage.name or path.startswith(stage.name + "."):
            return i
    sub = runnable.module.get_submodule(path)
    ids = {id(p) for p in sub.parameters(recurse=True)}
    canonical = dict(runnable.module.named_parameters())
    matches = [i for i, stage in enumerate(runnable.stages)
               if any(id(canonical[n]) in ids for n in stage.params if n in canonical)]
    if len(matches) == 1:
        return matches[0]
    # a tied parameter is read by several stages: the submodule's own non-shared parameters decide, else its
    # kind: lookups are the first stage that reads it, linear maps the last
    if matches:
        return matches[0] if isinstance(sub, torch.nn.Embedding) else matches[-1]
    return None


# ----------------------------------------------------------------------------------------- activation statistics

@dataclass
class ActivationMoments:
    """Uncentred second moment C = (1/T) Σ_t x_t x_tᵀ of the inputs x ∈ R^n of a matrix's linear uses (RMT.md §7)."""

    name: str
    sum_xxT: np.ndarray  # (n, n) float64, Σ_t x_t x_tᵀ
    count: int  # T: activation vectors summed
    uses: list[str] = field(default_factory=list)  # submodule paths whose inputs were collected

    @property
    def covariance(self) -> np.ndarray:
        return self.sum_xxT / max(self.count, 1)


@torch.inference_mode()
def collect_input_moments(runnable, workspace, names: Iterable[str], input_ids: torch.Tensor, *,
                          batch_size: int = 8, progress: Progress | None = None
                          ) -> tuple[dict[str, ActivationMoments], dict[str, str]]:
    """Input-activation second moments of the linear uses of each matrix, from forward hooks on the untouched model.

    A matrix of analysed shape (rows, cols) is fed activations x ∈ R^cols wherever a submodule holding its parameter
    multiplies them (nn.Linear, Hugging Face Conv1D); embedding lookups read rows by index and contribute nothing.
    Returns (moments by name, reason by name for the matrices without any linear use). The hooks are removed before
    returning; run this while no other thread runs the same module."""
    names = list(names)
    moments: dict[str, ActivationMoments] = {}
    skipped: dict[str, str] = {}
    handles = []

    def hook_for(acc: ActivationMoments, cols: int):
        def hook(_module, args, _output):
            if not args or not torch.is_tensor(args[0]) or not torch.is_floating_point(args[0]):
                return
            x = args[0]
            if x.shape[-1] != cols:
                return
            x = x.reshape(-1, cols).detach().to(torch.float64).numpy()
            acc.sum_xxT += x.T @ x  # numpy: one BLAS thread (spectral/__init__.py), no pool contention
            acc.count += x.shape[0]
        return hook

    try:
        for name in names:
            info = workspace.info(name)
            linear = [u for u in module_uses(runnable, info) if u.kind == "linear"]
            if not linear:
                skipped[info.name] = "no linear use (an embedding lookup reads rows by index: no input activations)"
                continue
            cols = info.shape[1]
            acc = ActivationMoments(info.name, np.zeros((cols, cols)), 0,
                                    [u.path for u in linear])
            moments[info.name] = acc
            for use in linear:
                sub = runnable.module.get_submodule(use.path)
                handles.append(sub.register_forward_hook(hook_for(acc, cols)))
        n = input_ids.shape[0]
        with blas_single_thread():
            for a in range(0, n, batch_size):
                if progress:
                    progress(a, n, "activations")
                runnable.forward(input_ids[a:a + batch_size])
        if progress:
            progress(n, n, "")
    finally:
        for h in handles:
            h.remove()
    for name, acc in list(moments.items()):
        if acc.count == 0:
            del moments[name]
            skipped[name] = "its linear uses saw no input of matching width during the forward pass"
    return moments, skipped
