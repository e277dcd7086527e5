"""What a cut does to the model's outputs: a fixed evaluation batch, reference outputs computed once, and metrics.

Metrics for a causal language model, over every predicted position i of the batch (DESIGN.md `prune`):
- agreement: mean 1[argmax p_i = argmax q_i], p the untouched model's next-token distribution, q the cut model's;
- kl: mean KL(p_i ‖ q_i) = Σ_v p_iv (log p_iv − log q_iv) in nats (`position_metrics` says how it stays accurate
  in float32 from KL 1e-12 to catastrophic cuts); no cut gives exactly 0;
- perplexity before / after: exp(mean −log p(next token)), where the batch comes from text (labels exist).
Encoders (kind "encoder") report the mean cosine between original and cut sentence embeddings and
nearest-neighbour agreement among the evaluation sentences instead, with kl None.

The batch: text the user gives ("text"), else the model's bundled held-out text ("bundled": the demo's heldout.txt),
else, with a tokenizer, CPython's pydoc_data.topics ("builtin"), else sequences sampled from the untouched model
itself, seeded ("sampled"); `EvalBatch.source` says which. At least `DEFAULT_POSITIONS` predicted positions when the
text is long enough. Encoders get sentences instead (`sentence_batch`: one padded row
per sentence): the user's text, else the bundled text, else sentences of CPython's `pydoc_data.topics` ("builtin"),
else, without a tokenizer, seeded random token ids ("random").

`Evaluator` holds the untouched model's outputs on the fixed batch; spectral/whatif.py's session compares cut models
with it (one slider move = `WhatIfSession.run`).
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pydoc_data.topics import topics

import torch

from spectral.heap import release_freed_memory
from spectral.lowrank import ImplicitWeight

DEFAULT_POSITIONS = 2048  # predicted positions in the evaluation batch (issue 4: at least 2,000 for the demo)
DEFAULT_SEQUENCE = 128  # tokens per evaluation sequence when the model allows it
DEFAULT_SENTENCES = 64  # encoders: evaluation sentences (nearest-neighbour agreement is among these)
CHUNK_ELEMENTS = 1 << 21  # logits processed per metrics chunk (8 MB of float32)
PHI_SERIES_BOUND = 0.5  # |x| up to which φ(x) = e^x − 1 − x is summed as its Taylor series (see `phi`)
_EXP_OVERFLOW = 88.0  # e^x overflows float32 just above 88.72
_PHI_COEFFICIENTS = tuple(1.0 / math.factorial(k) for k in range(2, 10))  # 1/2!, ..., 1/9!

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
        """Predicted positions (causal LMs), real tokens (encoders) or images (image classifiers: pixel inputs)."""
        if self.real_tokens is not None:
            return self.real_tokens
        return self.sequences if self.input_ids.is_floating_point() else int(self.input_ids.numel())

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
    device = module_device(runnable)
    for _ in range(length - 1):
        logits = _last_logits(runnable, ids.to(device)).cpu()  # sampled on the CPU: the same tokens on any device
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


def builtin_text() -> str:
    """CPython's `pydoc_data.topics` (the demo's corpus): English text every Python ships, the evaluation text of a
    model that brings none of its own."""
    return "\n\n".join(topics[k] for k in sorted(topics))


def _encoder_batch(runnable, text: str | None, seed: int, length: int | None) -> EvalBatch:
    if text is not None:
        return sentence_batch(runnable, text, source="text", length=length)
    if runnable.eval_text and runnable.tokenizer is not None:
        return sentence_batch(runnable, runnable.eval_text, source="bundled", length=length,
                              detail="sentences of the held-out text shipped with the model")
    if runnable.tokenizer is not None:
        return sentence_batch(runnable, builtin_text(), source="builtin", length=length,
                              detail="sentences of CPython's pydoc_data.topics (no evaluation text given)")
    return random_sentence_batch(runnable, seed=seed)


def make_eval_batch(runnable, text: str | None = None, *, positions: int = DEFAULT_POSITIONS, seed: int = 0,
                    length: int | None = None) -> EvalBatch:
    """The evaluation batch: the user's text if given, else the model's bundled held-out text, else CPython's
    pydoc_data.topics when the model has a tokenizer (reading text costs one forward pass; sampling from a large
    model costs one per token), else sequences sampled from the model (encoders: sentences, see `_encoder_batch`;
    image classifiers: the images the runnable brings, `Runnable.eval_inputs`; KL and top-1 agreement are then over
    classes, one position per image)."""
    kind = getattr(runnable, "kind", None)
    if kind == "encoder":
        return _encoder_batch(runnable, text, seed, length)
    if kind == "image_classifier":
        if runnable.eval_inputs is None:
            raise EvaluationError("this image classifier has no evaluation images")
        if text is not None:
            raise EvaluationError("an image classifier is evaluated on images, not text")
        return EvalBatch(runnable.eval_inputs, None, "images", runnable.eval_inputs_source)
    if text is not None:
        return text_batch(runnable, text, source="text", positions=positions, length=length)
    if runnable.eval_text and runnable.tokenizer is not None:
        return text_batch(runnable, runnable.eval_text, source="bundled", detail="held-out text shipped with the model",
                          positions=positions, length=length)
    if runnable.tokenizer is not None:
        return text_batch(runnable, builtin_text(), source="builtin",
                          detail="CPython's pydoc_data.topics (the model ships no evaluation text)",
                          positions=positions, length=length)
    return sample_batch(runnable, positions=positions, length=length, seed=seed)


# ---------------------------------------------------------------------------------------------------- the metrics

@dataclass
class EvalMetrics:
    """Outputs of the cut model against the untouched one on the fixed batch (or, when `estimate`, on its fixed
    subset, with standard errors over the subset's sequences)."""

    agreement: float  # top-1 (causal LM) or nearest-neighbour (encoder) agreement, 0..1
    kl: float | None  # mean KL(original ‖ cut) in nats per predicted position (None for encoders)
    perplexity_before: float | None
    perplexity_after: float | None
    cosine: float | None = None  # encoders: mean cosine of original and cut embeddings
    seconds: float = 0.0
    start_stage: int = 0  # first stage re-run (0 = the whole forward pass)
    estimate: bool = False  # from the estimate subset, not the full batch
    positions: int = 0  # predicted positions (sentences for encoders) the numbers are over
    agreement_se: float | None = None  # standard errors over sequences (estimates only)
    kl_se: float | None = None
    perplexity_se: float | None = None


def module_device(runnable) -> torch.device:
    """The device of a runnable's parameters (the CPU for a module without any)."""
    module = getattr(runnable, "module", None)
    first = None if module is None else next(module.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def to_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A cut matrix on `device`, an implicit one kept implicit (spectral/lowrank.py)."""
    return value.to_device(device) if isinstance(value, ImplicitWeight) else value.to(device)


@dataclass
class _Reference:
    """The untouched model on one part of the batch: stage inputs (every STAGE_INPUT_STRIDE-th, and the head's), and
    its outputs (kept, or recomputed from the head's input when keeping them would cost more memory than
    `Evaluator.keep_bytes` allows)."""

    rows: torch.Tensor  # which sequences of the batch (indices)
    input_ids: torch.Tensor
    targets: torch.Tensor | None
    stage_inputs: list  # input of each stage on the untouched model (None where not kept: STAGE_INPUT_STRIDE)
    logits: torch.Tensor | None  # (P, V) float32 (encoders: (B, C) embeddings); None: recomputed when needed
    lse: torch.Tensor | None  # (P,) log-sum-exp of the logits
    argmax: torch.Tensor | None  # (P,)
    nll: torch.Tensor | None  # (P,) float64 −log p(target)


@dataclass
class PositionMetrics:
    """Per predicted position: KL(p‖q) in nats, top-1 agreement, and −log q(target) where labels exist."""

    kl: torch.Tensor  # (P,) float64
    agree: torch.Tensor  # (P,) bool
    nll: torch.Tensor | None  # (P,) float64


def phi(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = e^x − 1 − x ≥ 0 elementwise, to ~3e-7 relative in float32: the Taylor series to x⁹/9! (Horner) where
    |x| ≤ 0.5, where `expm1(x) − x` would cancel, and `expm1(x) − x` beyond (+inf where e^x overflows float32).
    Overwrites nothing.

    The two are blended by `lerp` with a 0/1 weight, not `torch.where`: on CPU `where` cost 9 ms per 2 M entries,
    6x the lerp, and it was the largest single cost of a catastrophic cut's metrics."""
    lo, hi = torch.aminmax(x)  # one pass: mild cuts often have no entry beyond the bound, and skip the rest
    mixed = not (float(hi) <= PHI_SERIES_BOUND and float(lo) >= -PHI_SERIES_BOUND)  # a NaN anywhere: mixed too, so
    # that the other entries still get expm1 beyond the bound (aminmax of a tensor with a NaN is NaN)
    s = x.clamp(-PHI_SERIES_BOUND, PHI_SERIES_BOUND) if mixed else x  # the series on the clamped value stays finite
    g = torch.full_like(x, _PHI_COEFFICIENTS[-1])
    for c in reversed(_PHI_COEFFICIENTS[:-1]):  # g ← c + g·s, one pass each (half the passes of mul_ then add_)
        torch.addcmul(torch.tensor(c, dtype=x.dtype, device=x.device), g, s, out=g)
    g.mul_(s).mul_(s)
    if not mixed:
        return g
    beyond = x.abs().sub_(PHI_SERIES_BOUND).mul_(1e30).clamp_(0.0, 1.0)  # 1 beyond the bound, 0 within (exactly)
    g.lerp_(torch.expm1(x).sub_(x), beyond)
    if not float(hi) <= _EXP_OVERFLOW:  # lerp makes inf − inf·0 = nan of an overflowed e^x: it is +inf
        g = g.nan_to_num_(nan=math.inf, posinf=math.inf)
    return g


def position_metrics(ref_logits: torch.Tensor, ref_lse: torch.Tensor, ref_argmax: torch.Tensor,
                     logits: torch.Tensor, targets: torch.Tensor | None = None) -> PositionMetrics:
    """KL(p‖q), top-1 agreement and −log q(target) for every row of (P, V) logits, p = softmax(ref_logits),
    q = softmax(logits), in chunks of `CHUNK_ELEMENTS`.

    KL, accurately in float32 for tiny and catastrophic cuts alike: with d = z_ref − z and u = d − E_p[d],
    KL = E_p[d] + log E_p[e^{−d}] = A + log1p(B − A), A = E_p[u] (≈ 0) and B = E_p[φ(−u)] (φ(x) = e^x − 1 − x ≥ 0).
    B is a sum of non-negative terms, so it keeps float32's relative precision however small the KL, and an error in
    A only enters at second order. Where e^{−u} overflows float32 (logit changes beyond ~88), the direct difference
    E_p[d] − (lse_ref − lse) is used: the KL is then large, so its relative error stays small. Checked against
    float64 and mpmath references in tests/test_evaluation.py (1e-6 relative)."""
    P, V = logits.shape
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    kl = torch.empty(P, dtype=torch.float64)
    agree = torch.empty(P, dtype=torch.bool)
    nll = torch.empty(P, dtype=torch.float64) if targets is not None else None
    for a in range(0, P, step):
        b = min(a + step, P)
        z, z0, lse0 = logits[a:b], ref_logits[a:b], ref_lse[a:b]
        p = torch.sub(z0, lse0[:, None]).exp_()
        total = p.sum(-1).double()  # 1 up to lse0's rounding, which dividing by it removes from A and B alike
        w = torch.sub(z, z0)  # −d
        mean = torch.linalg.vecdot(p, w)  # −E_p[d] (unnormalised)
        w.sub_((mean / total.float())[:, None])  # w = −u
        A = -torch.linalg.vecdot(p, w).double() / total
        B = torch.linalg.vecdot(p, phi(w)).double() / total
        value = A + torch.log1p((B - A).clamp_min(-0.5))
        finite = torch.isfinite(B)
        top, top_index = z.max(dim=-1)  # argmax and the log-sum-exp's shift in one pass
        lse = torch.sub(z, top[:, None], out=w).exp_().sum(-1).log_().add_(top)
        if not bool(finite.all()):
            value = torch.where(finite, value, (lse - lse0).double() - mean.double() / total)
        kl[a:b] = value.clamp_min_(0.0)
        agree[a:b] = top_index == ref_argmax[a:b]
        if nll is not None:
            nll[a:b] = (lse - z.gather(1, targets[a:b, None])[:, 0]).double()
    return PositionMetrics(kl, agree, nll)


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


ESTIMATE_SEQUENCES = 8  # sequences in the estimate subset (spread evenly over the batch)
ESTIMATE_TOKENS = 32  # their first tokens: the subset's logits equal the full batch's at those positions (causal)
CHUNK_POSITIONS = 512  # positions per evaluation chunk: a rerun request can interrupt between chunks
KEEP_REFERENCE_BYTES = 256 * 2**20  # reference logits kept up to this size; beyond it they are recomputed
HEAD_POSITIONS = 128  # a staged causal LM's head runs on this many positions (whole sequences, at least one) at a
# time: the logits of a chunk (cut and untouched, each positions × vocabulary floats) never exist whole. SmolLM2's
# shape (vocabulary 49,152; chunks of 512 positions): 200 MiB less at the peak of a what-if move, at no cost in time
# (bench/bench_whatif.py, 2026-12-01)
STAGE_INPUT_STRIDE = 2  # the untouched model's input to every 2nd stage is kept (and the head's): a cut re-runs at
# most one untouched stage more, for half the activations (SmolLM2's shape, 2,048 positions: 73 MiB less)
ESTIMATE_WORTH_SECONDS = 0.5  # a full batch slower than this gets an estimate first


def _stack_or_none(parts: list, attr: str):
    values = [getattr(p, attr) for p in parts]
    return None if any(v is None for v in values) else torch.cat(values)


class Evaluator:
    """The untouched model's outputs on a fixed batch, computed once; `evaluate(overrides)` compares a cut model.

    The batch is evaluated in chunks of about `CHUNK_POSITIONS` positions (`progress` reports each, so a caller can
    stop between them), and, for causal LMs, a fixed estimate subset (the first `ESTIMATE_TOKENS` positions of
    `ESTIMATE_SEQUENCES` sequences spread over the batch: a true subset of its positions, since a causal model's
    outputs there do not depend on later tokens) gives a quick estimate with standard errors over its sequences.
    Reference logits larger than `keep_bytes` are not kept: staged models recompute them from the cached input of the
    last stage (the head), which costs one head pass per evaluation and gives the same numbers.

    Read-only after construction, so one evaluator serves every session on the same checkpoint and text (their
    forward passes take turns on the runtime's lock: spectral/runtime.py)."""

    def __init__(self, runnable, batch: EvalBatch, *, chunk_positions: int = CHUNK_POSITIONS,
                 keep_bytes: int = KEEP_REFERENCE_BYTES, lazy: bool = False):
        self.runnable = runnable
        self.batch = batch
        self.device = module_device(runnable)  # inputs and cut matrices go where the model is (spectral/runtime.py)
        start = time.perf_counter()
        n = batch.sequences
        per_row = max(1, batch.positions // max(n, 1))
        step = max(1, chunk_positions // per_row)
        self._chunks = [torch.arange(a, min(a + step, n)) for a in range(0, n, step)]
        vocab = runnable.vocab_size or 0
        self.keep_logits = not runnable.stages or batch.positions * vocab * 4 <= keep_bytes
        self._parts: list[_Reference] | None = None
        self._estimate = None
        if self.kind == "causal_lm" and n >= 2 and batch.input_ids.shape[1] > ESTIMATE_TOKENS // 2:
            k = min(ESTIMATE_SEQUENCES, n)
            rows = torch.tensor(sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}))
            length = min(ESTIMATE_TOKENS, batch.input_ids.shape[1])
            if rows.numel() * length < batch.positions:
                self._estimate = self._reference(rows, batch.input_ids[rows, :length], None if batch.targets is None
                                                 else batch.targets[rows, :length])
        self.estimate_seconds = time.perf_counter() - start
        self.reference_seconds = 0.0
        if not lazy:
            self.prepare()

    def prepare(self, progress: Progress | None = None) -> None:
        """Run the untouched model over the whole batch, chunk by chunk (done once; later calls return at once)."""
        if self._parts is not None:
            return
        start = time.perf_counter()
        parts = []
        batch = self.batch
        for i, rows in enumerate(self._chunks):
            parts.append(self._reference(rows, batch.input_ids[rows],
                                         None if batch.targets is None else batch.targets[rows]))
            if progress:
                progress(i + 1, len(self._chunks), "untouched model")
        self._parts = parts
        release_freed_memory()  # the forward passes' temporaries (spectral/heap.py)
        self.reference_seconds = time.perf_counter() - start

    @property
    def ready(self) -> bool:
        """The untouched model's outputs over the whole batch are computed."""
        return self._parts is not None

    @property
    def parts(self) -> list[_Reference]:
        self.prepare()
        return self._parts

    @property
    def worth_estimating(self) -> bool:
        """An estimate first is worth showing: there is a subset, and the full batch takes noticeably longer."""
        if self._estimate is None:
            return False
        if self._parts is None:
            return True
        return self.reference_seconds > ESTIMATE_WORTH_SECONDS

    @property
    def kind(self) -> str:
        return self.runnable.kind

    @property
    def estimate_positions(self) -> int:
        """Positions of the estimate subset (0 without one)."""
        return 0 if self._estimate is None else int(self._estimate.input_ids.numel())

    # ---------------------------------------------------------------------------------------------- reference

    @torch.inference_mode()
    def _run_stages(self, overrides: Mapping[str, torch.Tensor], start: int, x, keep: list | None = None,
                    stop: int | None = None):
        """Stages start..stop on x; with `keep`, each stage's input is appended (None where STAGE_INPUT_STRIDE
        skips it, except the last stage's: the head's input recomputes the untouched logits)."""
        last = len(self.runnable.stages) - 1
        for i, stage in enumerate(self.runnable.stages[start:stop], start):
            if keep is not None:
                keep.append(x if i % STAGE_INPUT_STRIDE == 0 or i == last else None)
            x = stage.run(overrides, x)
        return x

    def _resume(self, part: _Reference, overrides: Mapping[str, torch.Tensor], start: int, stop: int | None = None):
        """The cut model from stage `start` on: from the nearest kept input at or before it (the stages between read
        nothing the cut changes, so they run as the untouched model did)."""
        begin = max(i for i in range(start + 1) if part.stage_inputs[i] is not None)
        return self._run_stages(overrides, begin, part.stage_inputs[begin], stop=stop)

    def _on_device(self, overrides: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The cut matrices where the model is (the pruner makes them on the CPU); the CPU passes them through."""
        if self.device.type == "cpu" or not overrides:
            return overrides
        return {name: to_device(value, self.device) for name, value in overrides.items()}

    @torch.inference_mode()
    def _reference(self, rows: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor | None) -> _Reference:
        keep: list = []
        ids = ids.to(self.device)
        targets = None if targets is None else targets.to(self.device)
        if self.kind == "causal_lm" and self.runnable.stages:
            keep.append(self._run_stages({}, 0, ids, keep, stop=-1))  # the head's input, then the head in slices
            flat_targets = None if targets is None else targets.reshape(-1)
            pieces = []  # (lse, argmax, nll, the logits when kept) of each slice
            for a, b, logits in self._head_slices({}, keep[-1]):
                *summary, logits = _head_summary(logits, None if flat_targets is None else flat_targets[a:b])
                pieces.append((*summary, logits if self.keep_logits else None))
            lse, argmax, nll, kept = (None if pieces[0][i] is None else torch.cat([p[i] for p in pieces])
                                      for i in range(4))
            return _Reference(rows, ids, targets, keep, kept, lse, argmax, nll)
        out = self._run_stages({}, 0, ids, keep) if self.runnable.stages else self.runnable.forward(ids)
        if self.kind == "encoder":
            return _Reference(rows, ids, targets, keep, out, None, None, None)
        logits = out.reshape(-1, out.shape[-1]).float()
        lse, argmax, nll, _ = _head_summary(logits, None if targets is None else targets.reshape(-1))
        return _Reference(rows, ids, targets, keep, logits if self.keep_logits else None, lse, argmax, nll)

    def _head_slices(self, overrides: Mapping[str, torch.Tensor], states: torch.Tensor):
        """(a, b, logits of positions a..b) of a staged causal LM's head over its input states (B, T, C), run on
        whole sequences, as many as HEAD_POSITIONS positions hold (at least one): the head is position-wise
        (models/contract.py `Stage`), but a Hugging Face head may embed placeholder ids of its input's shape."""
        head = self.runnable.stages[-1]
        rows, length = states.shape[0], states.shape[1]
        step = max(1, HEAD_POSITIONS // max(length, 1))
        for r in range(0, rows, step):
            out = head.run(overrides, states[r:r + step])
            n = out.shape[0] * length
            yield r * length, r * length + n, out.reshape(n, out.shape[-1]).float()

    def _reference_logits(self, part: _Reference) -> torch.Tensor:
        """The untouched logits of a part: kept, or recomputed by the last stage from its cached input."""
        if part.logits is not None:
            return part.logits
        with torch.inference_mode():
            out = self.runnable.stages[-1].run({}, part.stage_inputs[-1])
        return out.reshape(-1, out.shape[-1]).float()

    @property
    def reference_outputs(self) -> torch.Tensor:
        """The untouched model's logits (P, V) or embeddings (B, C) over the whole batch, in batch order."""
        return torch.cat([self._reference_logits(p) for p in self.parts])

    @property
    def perplexity_before(self) -> float | None:
        nll = _stack_or_none(self.parts, "nll")
        return None if nll is None else math.exp(float(nll.mean()))

    # ------------------------------------------------------------------------------------------------ the cut

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
    def _outputs(self, part: _Reference, overrides: Mapping[str, torch.Tensor], start: int) -> torch.Tensor:
        if self.runnable.stages:
            if start >= len(self.runnable.stages):
                return self._reference_logits(part)
            out = self._resume(part, overrides, start)
        elif start == 0:
            out = self.runnable.forward(part.input_ids, overrides)
        else:
            return self._reference_logits(part)
        return out if self.kind == "encoder" else out.reshape(-1, out.shape[-1]).float()

    @torch.inference_mode()
    def outputs(self, overrides: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(outputs of the cut model over the whole batch, first stage re-run); untouched stages come from the
        cached activations."""
        start = self.start_stage(overrides)
        overrides = self._on_device(overrides)
        return torch.cat([self._outputs(p, overrides, start) for p in self.parts]), start

    @torch.inference_mode()
    def _part_metrics(self, part: _Reference, overrides: Mapping[str, torch.Tensor], start: int) -> PositionMetrics:
        """Position metrics of the cut model on one part. A staged causal LM whose head runs again is run through its
        body, then its head and the untouched one slice by slice (`_head_slices`), metrics as they come."""
        stages = self.runnable.stages
        if self.kind == "causal_lm" and stages and start >= len(stages):  # no stage reads a changed parameter:
            n = part.lse.numel()  # the untouched model's outputs, exactly
            return PositionMetrics(torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.bool), part.nll)
        if self.kind != "causal_lm" or not stages:
            return self._position_metrics(part, self._outputs(part, overrides, start))
        states = part.stage_inputs[-1] if start == len(stages) - 1 else self._resume(part, overrides, start, stop=-1)
        targets = part.targets.reshape(-1) if part.targets is not None else None
        untouched = None if part.logits is not None else self._head_slices({}, part.stage_inputs[-1])
        found = []
        for a, b, logits in self._head_slices(overrides, states):
            reference = part.logits[a:b] if untouched is None else next(untouched)[2]
            found.append(position_metrics(reference, part.lse[a:b], part.argmax[a:b], logits,
                                          None if targets is None else targets[a:b]))
        return _merged(found)

    @torch.inference_mode()
    def _position_metrics(self, part: _Reference, outputs: torch.Tensor) -> PositionMetrics:
        logits = outputs.reshape(-1, outputs.shape[-1]).float()
        targets = part.targets.reshape(-1) if part.targets is not None else None
        return position_metrics(self._reference_logits(part), part.lse, part.argmax, logits, targets)

    @torch.inference_mode()
    def positions(self, outputs: torch.Tensor) -> PositionMetrics:
        """Per-position KL, agreement and NLL of causal-LM outputs over the whole batch against the reference."""
        logits = outputs.reshape(-1, outputs.shape[-1])
        found, offset = [], 0
        for part in self.parts:
            n = part.input_ids.numel()
            found.append(self._position_metrics(part, logits[offset:offset + n]))
            offset += n
        return _merged(found)

    def _summary(self, m: PositionMetrics, *, seconds: float, start: int) -> EvalMetrics:
        after = None if m.nll is None else math.exp(float(m.nll.mean()))
        return EvalMetrics(float(m.agree.double().mean()), float(m.kl.mean()), self.perplexity_before, after, None,
                           seconds, start, positions=int(m.kl.numel()))

    @torch.inference_mode()
    def compare(self, outputs: torch.Tensor, *, start_stage: int = 0, seconds: float = 0.0) -> EvalMetrics:
        """Metrics of any outputs on this batch (a cut model's, or a custom forward's) against the reference."""
        if self.kind == "encoder":
            cosine, agreement = embedding_metrics(self.reference_outputs, outputs)
            return EvalMetrics(agreement, None, None, None, cosine, seconds, start_stage,
                               positions=int(outputs.shape[0]))
        return self._summary(self.positions(outputs), seconds=seconds, start=start_stage)

    @torch.inference_mode()
    def evaluate(self, overrides: Mapping[str, torch.Tensor] | None = None,
                 progress: Progress | None = None) -> EvalMetrics:
        """Metrics of the model with these parameters replaced (canonical names -> tensors) against the reference,
        chunk by chunk (`progress(i, chunks, "evaluation")` after each)."""
        self.prepare(progress)
        t0 = time.perf_counter()
        overrides = overrides or {}
        start = self.start_stage(overrides)
        overrides = self._on_device(overrides)
        if self.kind == "encoder":
            out = torch.cat([self._outputs(p, overrides, start) for p in self.parts])
            return self.compare(out, start_stage=start, seconds=time.perf_counter() - t0)
        found = []
        for i, part in enumerate(self.parts):
            found.append(self._part_metrics(part, overrides, start))
            if progress:
                progress(i + 1, len(self.parts), "evaluation")
        return self._summary(_merged(found), seconds=time.perf_counter() - t0, start=start)

    @torch.inference_mode()
    def estimate(self, overrides: Mapping[str, torch.Tensor] | None = None) -> EvalMetrics | None:
        """Quick metrics on the fixed estimate subset, with standard errors over its sequences (None without one).

        Per sequence j the mean KL, agreement and NLL over its positions; the estimate is the mean over sequences
        and its standard error sd/√n (the sequences are spread over the text, so they are close to independent);
        perplexity's error by the delta method, ppl·se(mean NLL)."""
        part = self._estimate
        if part is None:
            return None
        t0 = time.perf_counter()
        overrides = overrides or {}
        start = self.start_stage(overrides)
        overrides = self._on_device(overrides)
        m = self._part_metrics(part, overrides, start)
        n_seq = part.input_ids.shape[0]

        def mean_se(values: torch.Tensor) -> tuple[float, float]:
            per_sequence = values.double().reshape(n_seq, -1).mean(dim=1)
            se = float(per_sequence.std(unbiased=True)) / math.sqrt(n_seq) if n_seq > 1 else float("nan")
            return float(per_sequence.mean()), se

        agreement, agreement_se = mean_se(m.agree)
        kl, kl_se = mean_se(m.kl)
        after = after_se = before = None
        if m.nll is not None:
            nll, nll_se = mean_se(m.nll)
            after, after_se = math.exp(nll), math.exp(nll) * nll_se
            before = math.exp(float(part.nll.mean()))
        return EvalMetrics(agreement, kl, before, after, None, time.perf_counter() - t0, start, estimate=True,
                           positions=int(part.input_ids.numel()), agreement_se=agreement_se, kl_se=kl_se,
                           perplexity_se=after_se)


def _merged(found: list[PositionMetrics]) -> PositionMetrics:
    """Position metrics of consecutive pieces, as one."""
    nll = None if any(m.nll is None for m in found) else torch.cat([m.nll for m in found])
    return PositionMetrics(torch.cat([m.kl for m in found]), torch.cat([m.agree for m in found]), nll)


def _head_summary(logits: torch.Tensor, targets: torch.Tensor | None):
    """(log-sum-exp, argmax, −log p(target) in float64 or None, the logits) of untouched (P, V) logits."""
    lse = torch.logsumexp(logits, dim=-1)
    nll = None if targets is None else (lse - logits.gather(1, targets[:, None])[:, 0]).double()
    return lse, logits.argmax(dim=-1), nll, logits
