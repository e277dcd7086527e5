"""What a research view runs on: a checkpoint's `ModelRuntime` (spectra, model, evaluators) and one what-if session.

A `ResearchContext` is cheap and belongs to one caller (a CLI run, one dashboard request): the runtime, its
workspace and its evaluators are shared; the session's working copy of cut matrices is the context's own. Settings
are arguments of each view, never attributes of the context. Evaluation goes through the same `Evaluator` and
`WhatIfSession` as the Pruning page (spectral/evaluation.py, spectral/whatif.py), so a view's numbers and a slider's
agree.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from models.contract import locked_functional_call
from spectral.evaluation import DEFAULT_POSITIONS, EvalBatch, Evaluator
from spectral.matrices import to_stored
from spectral.pruning import Plan, PruneResult
from spectral.research.activations import Use, module_uses
from spectral.research.common import NeedsForward, Outcome, ResearchError, _json, calibration_split
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import WhatIfSession


class ResearchContext:
    """A checkpoint's runtime plus, when the model runs, the evaluation batch and a what-if session of its own."""

    def __init__(self, runtime: ModelRuntime, spec: BatchSpec = BatchSpec(), *, evaluator: Evaluator | None = None):
        self.runtime = runtime
        self.workspace = runtime.workspace
        self.spec = spec
        self._evaluator = evaluator  # a batch made elsewhere (tests, notebooks); else the runtime's for `spec`
        self._session: WhatIfSession | None = None
        self._split: tuple[EvalBatch, Evaluator] | None = None

    @classmethod
    def open(cls, source, *, text: str | None = None, positions: int = DEFAULT_POSITIONS,
             seed: int = 0, mapper=None, device=None) -> ResearchContext:
        """A context for a path, "demo", `Workspace` or `ModelRuntime`; a model that cannot run gives a context
        whose views that need a forward pass raise `NeedsForward`. `mapper`, `device`: as `ModelRuntime.open`."""
        runtime = source if isinstance(source, ModelRuntime) else ModelRuntime.open(
            source, mapper=mapper, **({} if device is None else {"device": device}))
        return cls(runtime, BatchSpec(text, positions, seed))

    # --------------------------------------------------------------------------------------------- what runs

    @property
    def runnable(self):
        return self.runtime.runnable

    @property
    def why_not(self) -> str | None:
        return self.runtime.why_not

    @property
    def runs(self) -> bool:
        return self.runnable is not None

    @property
    def metric(self) -> str | None:
        """"kl" for causal language models, "cosine" for encoders, None without a forward pass."""
        kind = self.runtime.kind
        return None if kind is None else ("cosine" if kind == "encoder" else "kl")

    def require_forward(self, view: str):
        """The runnable model, or `NeedsForward` naming the view and the reason."""
        if self.runnable is None:
            raise NeedsForward(self.workspace.checkpoint.source, f"the {view} view needs a forward pass and this "
                               f"checkpoint cannot be run ({self.why_not}); `analyze` still works")
        return self.runnable

    @property
    def session(self) -> WhatIfSession:
        """This context's what-if session (its own working copy; the evaluator is the runtime's, shared)."""
        if self._session is None:
            self.require_forward("requested")
            self._session = WhatIfSession(self.runtime, self.spec, evaluator=self._evaluator)
        return self._session

    @property
    def evaluator(self) -> Evaluator:
        """The untouched model's outputs on the fixed evaluation batch (built once per runtime and text)."""
        return self.session.evaluator

    def calibration(self) -> tuple[EvalBatch, Evaluator]:
        """(calibration batch, evaluator on disjoint evaluation data) for methods fitted to activations
        (`calibration_split`); built once per context."""
        if self._split is None:
            runnable = self.require_forward("requested")
            calib, batch = calibration_split(runnable, self.spec.text, positions=self.spec.positions,
                                             seed=self.spec.seed)
            self._split = (calib, self.runtime.evaluator_for(batch))
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

    def run_plan(self, plan: Plan) -> tuple[PruneResult, Outcome]:
        """(PruneResult, Outcome) of a plan on this context's working copy."""
        result = self.session.run_plan(plan)
        return result.prune, Outcome.from_metrics(result.metrics)

    def evaluate(self, overrides: Mapping[str, torch.Tensor]) -> Outcome:
        """Outcome of the model with these module parameters (canonical names) replaced; partial forward passes."""
        with self.runtime.lock:
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
        stored = to_stored(matrix.to(torch.float32), info)
        return {ref.name: (stored.T if ref.transposed else stored).contiguous()
                for ref in runnable.params_for([info.name, *info.tied_with])}

    def original(self, name: str) -> torch.Tensor:
        """Matrix `name` in the analysed layout, float32 (a fresh tensor; the checkpoint's is never handed out)."""
        return self.workspace.weight(name).to(torch.float32).clone()

    @torch.inference_mode()
    def compare(self, outputs: torch.Tensor) -> Outcome:
        """Outcome of outputs (logits (B, T, V) or embeddings) from a custom forward over the evaluation batch."""
        ev = self.evaluator
        m = ev.compare(outputs)
        error = None if ev.kind == "encoder" else relative_logit_error(ev.reference_outputs,
                                                                      outputs.reshape(-1, outputs.shape[-1]).float())
        return Outcome(m.agreement, m.kl, m.cosine, m.perplexity_before, m.perplexity_after, error)

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
            stored = to_stored(matrix.to(torch.float32), info)
            per_use[path] = (stored.T if canonical.transposed else stored).contiguous()
        with self.runtime.lock:
            if runnable.stages and all(u.stage is not None for u in uses.values()):
                x = ids
                for i, stage in enumerate(runnable.stages):
                    chosen = [per_use[p] for p, u in uses.items() if u.stage == i and p in per_use]
                    x = stage.run({canonical.name: chosen[0]} if chosen else {}, x)
                return x
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
