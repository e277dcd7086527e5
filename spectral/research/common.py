"""What the research views share: their errors, JSON helpers, the `Outcome` of a modified model, and the
calibration/evaluation split of the evaluation text."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tokenizers import Tokenizer

from spectral.evaluation import DEFAULT_POSITIONS, DEFAULT_SEQUENCE, EvalBatch, EvaluationError, sample_batch, windows

Progress = Callable[[int, int, str], None]


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
    BLAS threads on a busy 2-core machine (threadpoolctl is a runtime requirement)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def encode_all(tokenizer, text: str) -> list[int]:
    """Token ids of the whole text: a tokenizer.json that truncates (Hugging Face sentence models ship max_length
    128) is copied without truncation and padding first; the shared tokenizer is not modified."""
    if getattr(tokenizer, "truncation", None) or getattr(tokenizer, "padding", None):
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
