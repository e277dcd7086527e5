"""What a cut does to the model's outputs: a fixed evaluation batch, reference outputs computed once, and metrics.

Metrics for a causal language model, over every predicted position i of the batch (DESIGN.md `prune`):
- agreement: mean 1[argmax p_i = argmax q_i], p the untouched model's next-token distribution, q the cut model's;
- kl: mean KL(p_i ‖ q_i) = Σ_v p_iv (log p_iv − log q_iv) in nats, computed as Σ p d − log(1 + Σ q (e^d − 1)) with
  d = z_ref − z (the logit change). Both terms are O(d) and their difference O(d²), so a KL of 1e-10 keeps four
  digits in float32 (a plain log-softmax difference loses everything below ~1e-6); no cut gives exactly 0;
- perplexity before / after: exp(mean −log p(next token)), where the batch comes from text (labels exist).
Encoders (kind "encoder") report the mean cosine between original and cut sentence embeddings and
nearest-neighbour agreement among the evaluation sentences instead, with kl None.

The batch: text the user gives ("text"), else the model's bundled held-out text ("bundled": the demo's heldout.txt),
else sequences sampled from the untouched model itself, seeded ("sampled"); `EvalBatch.source` says which. At least `DEFAULT_POSITIONS`
predicted positions when the text is long enough. Encoders get sentences instead (`sentence_batch`: one padded row
per sentence): the user's text, else the bundled text, else sentences of CPython's `pydoc_data.topics` ("builtin"),
else, without a tokenizer, seeded random token ids ("random").

`WhatIf` ties a `Pruner` (spectral/pruning.py) to an `Evaluator`: one slider move = `WhatIf.run(...)`.
`sensitivity_scan` cuts one matrix (or one role) at a time and reports the KL each causes alone.
"""
from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from spectral.analysis import Settings
from spectral.pruning import Plan, Pruner, PruneResult, Strategy, in_scope, make_plan

DEFAULT_POSITIONS = 2048  # predicted positions in the evaluation batch (issue 4: at least 2,000 for the demo)
DEFAULT_SEQUENCE = 128  # tokens per evaluation sequence when the model allows it
DEFAULT_SENTENCES = 64  # encoders: evaluation sentences (nearest-neighbour agreement is among these)
CHUNK_ELEMENTS = 1 << 21  # logits processed per metrics chunk (8 MB of float32)
METRICS_CACHE = 64  # what-if results remembered per session (metrics only: a few numbers each)
EXPM1_SAFE = 1e6  # largest Σ q (e^d − 1) trusted (e^d overflows past d ≈ 88); beyond it lse_ref − lse is used

Progress = Callable[[int, int, str], None]


class EvaluationError(ValueError):
    """No usable evaluation batch (e.g. text given but no tokenizer, or text too short); the message says why."""


# ------------------------------------------------------------------------------------------------------- the batch

@dataclass
class EvalBatch:
    """Fixed inputs (N, T) and, for text, the next tokens as labels (N, T)."""

    input_ids: torch.Tensor
    targets: torch.Tensor | None
    source: str  # "bundled" (text shipped with the model), "text" (user's), "sampled" (from the model), "tokens"
    detail: str = ""
    real_tokens: int | None = None  # encoders: tokens that are not padding (None: every position is real)

    @property
    def sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def positions(self) -> int:
        return int(self.input_ids.numel()) if self.real_tokens is None else self.real_tokens

    def to_dict(self) -> dict:
        """DESIGN.md `eval`: source, sequences, tokens (predicted positions)."""
        return {"source": self.source, "sequences": self.sequences, "tokens": self.positions}


def windows(ids: torch.Tensor, positions: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of ceil(positions/length) windows of length+1 tokens spread evenly over `ids`
    (non-overlapping when the text allows, so the batch covers the whole text rather than its start)."""
    length = min(length, len(ids) - 1)
    if length < 1:
        raise EvaluationError("the evaluation text is shorter than two tokens")
    n = max(1, math.ceil(positions / length))
    span = len(ids) - (length + 1)
    n = min(n, span + 1)  # at most one window per start position
    starts = [round(i * span / max(n - 1, 1)) for i in range(n)] if n > 1 else [0]
    block = torch.stack([ids[s:s + length + 1] for s in starts])
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


def text_batch(runnable, text: str, *, source: str, detail: str = "", positions: int = DEFAULT_POSITIONS,
               length: int | None = None) -> EvalBatch:
    """Windows of tokenized text (needs the runnable's tokenizer)."""
    if runnable.tokenizer is None:
        raise EvaluationError("text was given but the model has no tokenizer (tokenizer.json) to read it")
    ids = torch.tensor(runnable.tokenizer.encode(text).ids, dtype=torch.long)
    if runnable.vocab_size is not None and len(ids) and int(ids.max()) >= runnable.vocab_size:
        raise EvaluationError("the tokenizer produces ids beyond the model's vocabulary")
    x, y = windows(ids, positions, length or min(DEFAULT_SEQUENCE, runnable.block_size))
    return EvalBatch(x, y, source, detail)


@torch.inference_mode()
def sample_batch(runnable, *, positions: int = DEFAULT_POSITIONS, length: int | None = None, seed: int = 0,
                 temperature: float = 1.0) -> EvalBatch:
    """Sequences sampled from the untouched model (seeded): a uniform first token, then ancestral sampling.

    There are no labels of the world here, so perplexity is not reported (targets None)."""
    if runnable.vocab_size is None:
        raise EvaluationError("cannot sample: the model's vocabulary size is unknown")
    length = min(length or DEFAULT_SEQUENCE, runnable.block_size)
    n = max(1, math.ceil(positions / length))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, runnable.vocab_size, (n, 1), generator=g)
    for _ in range(length - 1):
        logits = _last_logits(runnable, ids)
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return EvalBatch(ids, None, "sampled", f"{n} sequences of {length} tokens sampled from the model, seed {seed}")


def _last_logits(runnable, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position; with stages, the (position-wise) head runs on that position only."""
    if runnable.stages:
        x = ids
        for stage in runnable.stages[:-1]:
            x = stage.run({}, x)
        return runnable.stages[-1].run({}, x[:, -1:])[:, -1]
    return runnable.forward(ids)[:, -1]


def token_batch(ids: torch.Tensor, *, labelled: bool = True, detail: str = "") -> EvalBatch:
    """A batch from token ids (N, T+1) given directly (benchmarks, notebooks)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    return EvalBatch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous() if labelled else None, "tokens", detail)


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """Sentences of at least `min_words` words: split at . ! ? followed by white space, and at blank lines."""
    parts = re.split(r"(?<=[.!?])\s+|\n\s*\n", text)
    return [" ".join(p.split()) for p in parts if len(p.split()) >= min_words]


def sentence_batch(runnable, text: str, *, source: str, detail: str = "", sentences: int = DEFAULT_SENTENCES,
                   length: int | None = None) -> EvalBatch:
    """Encoders: up to `sentences` sentences spread evenly over `text`, one row each (the tokenizer's special tokens
    included, cut to `length` keeping the last token), padded with the model's pad id, which the model masks out."""
    if runnable.tokenizer is None:
        raise EvaluationError("text was given but the model has no tokenizer (tokenizer.json) to read it")
    found = split_sentences(text)
    if len(found) < 2:
        raise EvaluationError("the evaluation text has fewer than two sentences of three words or more; "
                              "nearest-neighbour agreement needs several")
    n = min(sentences, len(found))
    chosen = [found[round(i * (len(found) - 1) / max(n - 1, 1))] for i in range(n)]
    limit = min(length or DEFAULT_SEQUENCE, runnable.block_size)
    pad = runnable.pad_token_id if runnable.pad_token_id is not None else 0
    rows = []
    for sentence in chosen:
        enc = runnable.tokenizer.encode(sentence)
        ids = [i for i, m in zip(enc.ids, enc.attention_mask) if m]
        rows.append(ids if len(ids) <= limit else ids[:limit - 1] + ids[-1:])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    if runnable.vocab_size is not None and int(ids.max()) >= runnable.vocab_size:
        raise EvaluationError("the tokenizer produces ids beyond the model's vocabulary")
    detail = detail or f"{len(rows)} sentences"
    return EvalBatch(ids, None, source, detail, real_tokens=sum(len(r) for r in rows))


def random_sentence_batch(runnable, *, sentences: int = DEFAULT_SENTENCES, length: int = 32,
                          seed: int = 0) -> EvalBatch:
    """Encoders without a tokenizer: rows of uniformly random token ids (never the pad id), seeded."""
    if runnable.vocab_size is None:
        raise EvaluationError("cannot build random sentences: the model's vocabulary size is unknown")
    length = min(length, runnable.block_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, runnable.vocab_size - 1, (sentences, length), generator=g)
    if runnable.pad_token_id is not None:
        ids = ids + (ids >= runnable.pad_token_id).long()  # skip the pad id
    return EvalBatch(ids, None, "random", f"{sentences} rows of {length} random token ids, seed {seed} "
                                          "(no tokenizer: give tokenizer.json and text for real sentences)")


def _encoder_batch(runnable, text: str | None, seed: int, length: int | None) -> EvalBatch:
    if text is not None:
        return sentence_batch(runnable, text, source="text", length=length)
    if runnable.eval_text and runnable.tokenizer is not None:
        return sentence_batch(runnable, runnable.eval_text, source="bundled", length=length,
                              detail="sentences of the held-out text shipped with the model")
    if runnable.tokenizer is not None:
        from pydoc_data.topics import topics

        stock = "\n\n".join(topics[k] for k in sorted(topics))
        return sentence_batch(runnable, stock, source="builtin", length=length,
                              detail="sentences of CPython's pydoc_data.topics (no evaluation text given)")
    return random_sentence_batch(runnable, seed=seed)


def make_eval_batch(runnable, text: str | None = None, *, positions: int = DEFAULT_POSITIONS, seed: int = 0,
                    length: int | None = None) -> EvalBatch:
    """The evaluation batch: the user's text if given, else the model's bundled held-out text, else samples
    (encoders: sentences, see `_encoder_batch`)."""
    if getattr(runnable, "kind", None) == "encoder":
        return _encoder_batch(runnable, text, seed, length)
    if text is not None:
        return text_batch(runnable, text, source="text", positions=positions, length=length)
    if runnable.eval_text and runnable.tokenizer is not None:
        return text_batch(runnable, runnable.eval_text, source="bundled", detail="held-out text shipped with the model",
                          positions=positions, length=length)
    return sample_batch(runnable, positions=positions, length=length, seed=seed)


# ---------------------------------------------------------------------------------------------------- the metrics

@dataclass
class EvalMetrics:
    """Outputs of the cut model against the untouched one on the fixed batch."""

    agreement: float  # top-1 (causal LM) or nearest-neighbour (encoder) agreement, 0..1
    kl: float | None  # mean KL(original ‖ cut) in nats per predicted position (None for encoders)
    perplexity_before: float | None
    perplexity_after: float | None
    cosine: float | None = None  # encoders: mean cosine of original and cut embeddings
    seconds: float = 0.0
    start_stage: int = 0  # first stage re-run (0 = the whole forward pass)


@dataclass
class _Reference:
    stage_inputs: list[torch.Tensor]  # input of every stage on the untouched model
    logits: torch.Tensor  # (P, V) float32, P = predicted positions
    probs: torch.Tensor | None  # (P, V) softmax of the logits
    lse: torch.Tensor  # (P,) log-sum-exp of the logits
    argmax: torch.Tensor  # (P,)
    nll_sum: float | None  # Σ −log p(target)


def kl_agreement(ref_logits: torch.Tensor, ref_lse: torch.Tensor, ref_argmax: torch.Tensor, logits: torch.Tensor,
                 targets: torch.Tensor | None = None, ref_probs: torch.Tensor | None = None
                 ) -> tuple[float, float, float | None]:
    """(Σ KL(p‖q), Σ 1[argmax agrees], Σ −log q(target) or None) over rows of (P, V) logits, in chunks.

    p = softmax(ref_logits) (pass `ref_probs` to skip recomputing it), q = softmax(logits); KL as in the module
    docstring. Row-wise dot products (`vecdot`) avoid temporaries: the metrics cost a few passes over the logits."""
    P, V = logits.shape
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    kl_sum = agree = 0.0
    nll = 0.0 if targets is not None else None
    for a in range(0, P, step):
        z, z0 = logits[a:a + step], ref_logits[a:a + step]
        lse0 = ref_lse[a:a + step]
        p = ref_probs[a:a + step] if ref_probs is not None else torch.exp(z0 - lse0[:, None])
        top, argmax = z.max(dim=-1)  # one pass gives the log-sum-exp shift and the top-1 prediction
        e = torch.sub(z, top[:, None]).exp_()  # unnormalised q, one temporary
        total = e.sum(-1)
        lse = top + torch.log(total)
        d = z0 - z
        first = torch.linalg.vecdot(p, d).double()
        second = (torch.linalg.vecdot(e, d.expm1_()) / total).double()  # Σ q (e^d − 1) = e^{lse0 − lse} − 1
        if bool(torch.isfinite(second).all()) and float(second.max()) < EXPM1_SAFE:
            second = torch.log1p(second)
        else:  # huge logit changes: the e^d route overflows; the direct difference is accurate enough there
            second = (lse0 - lse).double()
        kl_sum += float((first - second).clamp_min(0.0).sum())
        agree += float((argmax == ref_argmax[a:a + step]).sum())
        if targets is not None:
            t = targets[a:a + step]
            nll += float((lse - z.gather(1, t[:, None])[:, 0]).sum(dtype=torch.float64))
    return kl_sum, agree, nll


def embedding_metrics(reference: torch.Tensor, embeddings: torch.Tensor) -> tuple[float, float]:
    """(mean cosine of each sentence's original and cut embedding, nearest-neighbour agreement).

    Nearest neighbour of sentence i: argmax_{j≠i} cos(e_i, e_j) among the evaluation sentences; agreement is the
    fraction of sentences whose neighbour is the same with the cut model as with the original."""
    a = torch.nn.functional.normalize(reference.double(), dim=-1)
    b = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    cosine = float((a * b).sum(-1).mean())
    if a.shape[0] < 2:
        return cosine, 1.0
    eye = torch.eye(a.shape[0], dtype=torch.bool)
    nn_a = (a @ a.T).masked_fill(eye, -math.inf).argmax(-1)
    nn_b = (b @ b.T).masked_fill(eye, -math.inf).argmax(-1)
    return cosine, float((nn_a == nn_b).double().mean())


class Evaluator:
    """The untouched model's outputs on a fixed batch, computed once; `evaluate(overrides)` compares a cut model.

    Read-only after construction, so one evaluator can serve several sessions on the same checkpoint."""

    def __init__(self, runnable, batch: EvalBatch):
        self.runnable = runnable
        self.batch = batch
        start = time.perf_counter()
        self._reference = self._compute_reference()
        self.reference_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def _run_stages(self, overrides: Mapping[str, torch.Tensor], start: int, x: torch.Tensor,
                    keep: list | None = None) -> torch.Tensor:
        for stage in self.runnable.stages[start:]:
            if keep is not None:
                keep.append(x)
            x = stage.run(overrides, x)
        return x

    @torch.inference_mode()
    def _compute_reference(self) -> _Reference:
        ids = self.batch.input_ids
        keep: list[torch.Tensor] = []
        if self.runnable.stages:
            out = self._run_stages({}, 0, ids, keep)
        else:
            out = self.runnable.forward(ids)
        if self.runnable.kind == "encoder":
            return _Reference(keep, out, None, None, None, None)
        logits = out.reshape(-1, out.shape[-1]).float()
        lse = torch.logsumexp(logits, dim=-1)
        nll = None
        if self.batch.targets is not None:
            t = self.batch.targets.reshape(-1)
            nll = float((lse - logits.gather(1, t[:, None])[:, 0]).sum(dtype=torch.float64))
        return _Reference(keep, logits, torch.exp(logits - lse[:, None]), lse, logits.max(dim=-1).indices, nll)

    @property
    def perplexity_before(self) -> float | None:
        ref = self._reference
        return None if ref.nll_sum is None else math.exp(ref.nll_sum / self.batch.positions)

    def start_stage(self, overrides: Mapping[str, torch.Tensor]) -> int:
        """Index of the first stage that reads an overridden parameter (len(stages) when none does)."""
        stages = self.runnable.stages
        if not stages:
            return 0 if overrides else 1
        changed = set(overrides)
        for i, stage in enumerate(stages):
            if stage.params & changed:
                return i
        return len(stages)

    @torch.inference_mode()
    def outputs(self, overrides: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(outputs of the cut model, first stage re-run); untouched stages come from the cached activations."""
        ref = self._reference
        start = self.start_stage(overrides)
        if self.runnable.stages:
            if start >= len(self.runnable.stages):
                return ref.logits, start
            out = self._run_stages(overrides, start, ref.stage_inputs[start])
        elif start == 0:
            out = self.runnable.forward(self.batch.input_ids, overrides)
        else:
            return ref.logits, start
        if self.runnable.kind == "encoder":
            return out, start
        return out.reshape(-1, out.shape[-1]).float(), start

    @torch.inference_mode()
    def evaluate(self, overrides: Mapping[str, torch.Tensor] | None = None) -> EvalMetrics:
        """Metrics of the model with these parameters replaced (canonical names -> tensors) against the reference."""
        t0 = time.perf_counter()
        out, start = self.outputs(overrides or {})
        ref = self._reference
        if self.runnable.kind == "encoder":
            cosine, agreement = embedding_metrics(ref.logits, out)
            return EvalMetrics(agreement, None, None, None, cosine, time.perf_counter() - t0, start)
        targets = self.batch.targets.reshape(-1) if self.batch.targets is not None else None
        kl_sum, agree, nll = kl_agreement(ref.logits, ref.lse, ref.argmax, out, targets, ref.probs)
        n = out.shape[0]
        after = None if nll is None else math.exp(nll / n)
        return EvalMetrics(agree / n, kl_sum / n, self.perplexity_before, after, None, time.perf_counter() - t0,
                           start)


# ---------------------------------------------------------------------------------------------- what-if sessions

@dataclass
class WhatIfResult:
    """One what-if: the plan, its storage effect and its output metrics (DESIGN.md `prune` JSON via `to_dict`)."""

    plan: Plan
    prune: PruneResult
    metrics: EvalMetrics
    batch: EvalBatch
    kind: str = "causal_lm"
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        s = self.plan.strategy
        m = self.metrics
        out = {
            "strategy": s.name, "value": s.value, "scope": self.plan.scope, "precision": s.precision,
            "agreement": m.agreement, "kl": m.kl,
            "perplexity_before": m.perplexity_before, "perplexity_after": m.perplexity_after,
            "params_before": self.prune.params_before, "params_after": self.prune.params_after,
            "compression": self.prune.compression,
            "eval": self.batch.to_dict(),
            "matrices": [r.to_dict() for r in self.prune.matrices],
            # additions beyond DESIGN.md's keys
            "metric": "kl" if self.kind == "causal_lm" else "cosine",
            "cosine": m.cosine,
            "bytes_before": self.prune.bytes_before, "bytes_after": self.prune.bytes_after,
            "overrides": {name: {"strategy": o.name, "value": o.value, "precision": o.precision}
                          for name, o in self.plan.overrides.items()},
            "warnings": list(self.plan.warnings),
            "seconds": self.timings,
        }
        return out


class WhatIf:
    """A what-if session on one checkpoint: plans -> cut weights -> metrics against the untouched model.

    `workspace` (spectral.workspace.Workspace) and `evaluator` may be shared between sessions; the pruner (the one
    working copy of the cut matrices) is this session's own."""

    def __init__(self, workspace, runnable=None, *, text: str | None = None, positions: int = DEFAULT_POSITIONS,
                 seed: int = 0, batch: EvalBatch | None = None, evaluator: Evaluator | None = None,
                 settings: Settings = Settings()):
        if runnable is None:
            from models.registry import runnable_model

            runnable = evaluator.runnable if evaluator is not None else runnable_model(workspace.checkpoint)
        self.workspace = workspace
        self.runnable = runnable
        self.settings = settings
        if evaluator is None:
            batch = batch or make_eval_batch(runnable, text, positions=positions, seed=seed)
            evaluator = Evaluator(runnable, batch)
        self.evaluator = evaluator
        self.pruner = Pruner(workspace, runnable)
        self._metrics: OrderedDict[frozenset, EvalMetrics] = OrderedDict()  # by the plan's cuts: a slider moved
        # back to a value already seen costs the rebuild only

    def plan(self, strategy: Strategy | str = "none", value: float | None = None, *, scope: str = "all",
             precision: str | None = None, overrides: Mapping[str, Strategy] | None = None) -> Plan:
        return make_plan(self.workspace, strategy, value, scope=scope, precision=precision, overrides=overrides,
                         settings=self.settings)

    def run(self, strategy: Strategy | str = "none", value: float | None = None, *, scope: str = "all",
            precision: str | None = None, overrides: Mapping[str, Strategy] | None = None) -> WhatIfResult:
        """One slider move: plan, rebuild what changed, evaluate."""
        t0 = time.perf_counter()
        plan = self.plan(strategy, value, scope=scope, precision=precision, overrides=overrides)
        return self.run_plan(plan, plan_seconds=time.perf_counter() - t0)

    def run_plan(self, plan: Plan, plan_seconds: float = 0.0) -> WhatIfResult:
        t0 = time.perf_counter()
        prune = self.pruner.apply(plan)
        t1 = time.perf_counter()
        key = frozenset(plan.cuts.items())
        metrics = self._metrics.get(key)
        if metrics is None:
            metrics = self.evaluator.evaluate(self.pruner.overrides())
            self._metrics[key] = metrics
            while len(self._metrics) > METRICS_CACHE:
                self._metrics.popitem(last=False)
        else:
            self._metrics.move_to_end(key)
        t2 = time.perf_counter()
        timings = {"plan": plan_seconds, "rebuild": t1 - t0, "evaluate": t2 - t1, "total": plan_seconds + t2 - t0}
        return WhatIfResult(plan, prune, metrics, self.evaluator.batch, self.runnable.kind, timings)

    def scan(self, strategy: Strategy | str, value: float | None = None, *, by: str = "matrix",
             scope: str = "all", precision: str | None = None, progress: Progress | None = None) -> list[dict]:
        return sensitivity_scan(self.workspace, self.evaluator, strategy, value, by=by, scope=scope,
                                precision=precision, settings=self.settings, progress=progress)


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def sensitivity_scan(workspace, evaluator: Evaluator, strategy: Strategy | str, value: float | None = None, *,
                     by: str = "matrix", scope: str = "all", precision: str | None = None,
                     settings: Settings = Settings(), progress: Progress | None = None) -> list[dict]:
    """Cut one matrix (by="matrix") or every matrix of one role (by="role") at a time with `strategy` and report
    the KL (and agreement) it causes alone, for a heatmap of where the model breaks.

    Rows: unit (matrix name or role), role, layer (first integer in the name, None otherwise), matrices, rank,
    kept_rank, relative_error, params_before, params_after, kl, agreement, cosine. Matrices the strategy leaves
    uncut get kl 0 without a forward pass. A cut in block L re-runs blocks L.. only (cached activations)."""
    if by not in ("matrix", "role"):
        raise ValueError(f"by must be 'matrix' or 'role', got {by!r}")
    full = make_plan(workspace, strategy, value, scope=scope, precision=precision, settings=settings)
    units: dict[str, list] = {}
    for info in workspace.matrices:
        if not in_scope(info.role, scope):
            continue
        units.setdefault(info.name if by == "matrix" else info.role, []).append(info)
    pruner = Pruner(workspace, evaluator.runnable)
    spectra = workspace.spectra() if by == "role" else {}
    rows = []
    for i, (unit, infos) in enumerate(units.items()):
        if progress:
            progress(i, len(units), unit)
        cuts = {info.name: full.cuts[info.name] for info in infos if info.name in full.cuts}
        plan = Plan(full.strategy, scope, cuts)
        prune = pruner.apply(plan)
        metrics = evaluator.evaluate(pruner.overrides()) if cuts else None
        mine = [r for r in prune.matrices if r.name in {info.name for info in infos}]
        layer = _LAYER.search(unit) if by == "matrix" else None
        rows.append({
            "unit": unit, "role": infos[0].role, "layer": int(layer.group(1)) if layer else None,
            "matrices": [info.name for info in infos],
            "rank": sum(r.rank for r in mine), "kept_rank": sum(r.kept_rank for r in mine),
            "relative_error": _pooled_error(mine, spectra) if by == "role" else mine[0].relative_error,
            "params_before": sum(r.params_before for r in mine), "params_after": sum(r.params_after for r in mine),
            "kl": metrics.kl if metrics else (0.0 if evaluator.runnable.kind == "causal_lm" else None),
            "agreement": metrics.agreement if metrics else 1.0,
            "cosine": metrics.cosine if metrics else (1.0 if evaluator.runnable.kind == "encoder" else None),
        })
    if progress:
        progress(len(units), len(units), "")
    return rows


def _pooled_error(rows, spectra) -> float:
    """sqrt(Σ ‖W − W'‖² / Σ ‖W‖²) over the matrices of a role: the relative error of the role as one block."""
    num = den = 0.0
    for r in rows:
        sq = float((spectra[r.name].singular_values ** 2).sum()) if r.name in spectra else float(r.params_before)
        num += r.relative_error**2 * sq
        den += sq
    return math.sqrt(num / den) if den > 0 else 0.0
