"""Heal: what a cut costs after the model is allowed to recover (issue 16; the crystallization study, papers 003).

`heal(session, HealConfig(steps, mode, train))` trains a copy of the session's cut model for a few steps and reports
the metrics of the same `Evaluator` as the Pruning page at step 0 (the cut as it stands), along the way and at the
end. Nothing shared is written: the runnable's module (every session's untouched model) is only called through
`torch.func.functional_call` with this heal's own tensors, and the session's working copy (its `Pruner`) is read once.

Objective (`mode`):
- "distill" (default): causal LMs minimise KL(p ‖ q) per position, p the untouched model's next-token distribution,
  q the healed model's, the direction of the reported `kl` (Hinton et al. 2015, "Distilling the knowledge in a
  neural network"); encoders minimise 1 − cos(e, e'), the untouched and healed sentence embeddings.
- "lm": next-token cross-entropy on the training tokens (the study's fine-tuning; causal LMs only).

What trains (`train`); healing never changes what a matrix stores:
- "factors": the cut matrices' low-rank factors only: W_k = A·B with A = U_k S_k^½ and B = S_k^½ V_kᵀ from the SVD
  (a spectrum band removed: the kept components), so the healed matrix keeps rank ≤ k and the storage of the cut;
- "unfrozen": those factors and every parameter no cut touches, except frozen matrices: the ones a plan replaces
  (strategies rank1, random, zero: the crystallization protocol freezes them) and any named in `freeze`;
- "all": everything, frozen matrices too (a rank-1 replacement trains as rank-1 factors, a random one dense; zeros,
  which store nothing, stay zeros).

Training tokens, never the held-out positions the metrics use:
- the bundled demo: its training text, CPython's pydoc_data.topics before the held-out slice (models/train_demo.py),
  when the bundled held-out text is exactly that slice (the topics repeat a few paragraphs, so one evaluated window
  also occurs elsewhere in that text, as it did when the demo was trained);
- other text (the user's, or held-out text shipped with a model): the tokens no evaluation window touches (the
  windows of `spectral.evaluation.windows`, recomputed and checked against the batch);
- sampled evaluation batches: fresh samples from the untouched model with another seed;
- encoders: the sentences of the evaluation text that the evaluation batch did not pick (too few: CPython's
  pydoc_data.topics sentences, minus the evaluation sentences); without a tokenizer, random token rows, another seed.

Optimiser: Adam (Kingma & Ba 2015), gradient norm clipped at 1, the learning rate annealed by a cosine from `lr` to 0
over the steps (Loshchilov & Hutter 2017, SGDR): Adam's steps keep their size however small the gradient, so at a
constant rate a nearly lossless cut drifts away from the untouched model (measured on the demo's energy-99.9% cut, 100
steps: KL 0.0002 -> 0.002 at lr 1e-4, -> 0.02 at 3e-4, -> 0.1 at 1e-3) and annealing lets it settle back. The model
stays in eval mode (no dropout), so a run is deterministic on CPU for a given seed. A healed model is saved with its factorised
matrices kept factorised (`save_healed`), with a loader note in the file's metadata; `densify` makes it dense.
"""
from __future__ import annotations

import json
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save, save_file

from models.contract import locked_functional_call
from models.train_demo import corpus_text
from spectral.evaluation import (
    DEFAULT_SENTENCES,
    DEFAULT_SEQUENCE,
    EvalMetrics,
    random_sentence_batch,
    sample_batch,
    sentence_batch,
    split_sentences,
)
from spectral.matrices import MatrixInfo, to_stored
from spectral.pruning import Cut, Plan, Strategy, pruned_metadata

HEAL_MODES = ("distill", "lm")
HEAL_TRAIN = ("factors", "unfrozen", "all")
REPLACEMENT_STRATEGIES = ("rank1", "random", "zero")  # the crystallization study's replacements: frozen by default
DEFAULT_LR = {"factors": 5e-4, "unfrozen": 2e-4, "all": 2e-4}  # peaks of the cosine (see Optimiser above)
CURVE_POINTS = 20  # evaluations along a heal by default (plus step 0 and the last step)
SAMPLE_SEED_OFFSET = 1_000_003  # fresh samples for training: the evaluation's seed plus this
POOL_SEQUENCES = 64  # sampled training sequences (causal LMs without text)
POOL_SENTENCES = 2048  # encoders: training sentences kept (spread evenly over those available)
MIN_WINDOW = 8  # shortest training window (tokens) the evaluation text's gaps must allow
CLIP_NORM = 1.0
FACTOR_A, FACTOR_B = ".factor_a", ".factor_b"  # suffixes of a factorised matrix's tensors in a saved file
LOADER_NOTE = ("Matrices listed in metadata 'spectra_factorised' are stored factorised: NAME = NAME.factor_a @ "
               "NAME.factor_b (float32, the checkpoint's stored layout; shape and rank in the entry), and each name "
               "in its 'tied_with' is the same matrix. spectral.heal.densify_file(this, out) writes the dense "
               "checkpoint that spectral.checkpoint.load_checkpoint and models.registry.runnable_model read.")

Progress = Callable[[int, int, str], None]


class HealError(ValueError):
    """A heal that cannot run with these inputs (nothing to train, no training tokens, ...); the message says why."""


@dataclass(frozen=True)
class HealConfig:
    """How to heal: steps, objective, what trains, learning rate (None: `DEFAULT_LR[train]`), batch of `batch`
    sequences of `length` tokens (encoders: sentences), seed, evaluation every `eval_every` steps (None: about
    `CURVE_POINTS` points), and matrices kept frozen at their (cut) values besides the plan's replacements."""

    steps: int = 50
    mode: str = "distill"
    train: str = "factors"
    lr: float | None = None
    batch: int = 8
    length: int = DEFAULT_SEQUENCE
    seed: int = 0
    eval_every: int | None = None
    freeze: frozenset[str] = frozenset()
    anneal: bool = True  # cosine decay of the learning rate to 0 over `steps` (False: constant)

    def __post_init__(self):
        if self.mode not in HEAL_MODES:
            raise HealError(f"unknown heal mode {self.mode!r}; choose one of {', '.join(HEAL_MODES)}")
        if self.train not in HEAL_TRAIN:
            raise HealError(f"unknown heal training set {self.train!r}; choose one of {', '.join(HEAL_TRAIN)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise HealError(f"heal steps must be a non-negative integer, got {self.steps!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise HealError(f"heal learning rate must be a positive number, got {self.lr!r}")
        if self.batch < 1 or self.length < 2:
            raise HealError(f"heal batch must be at least 1 and length at least 2, got {self.batch}, {self.length}")
        if self.eval_every is not None and self.eval_every < 1:
            raise HealError(f"heal eval_every must be positive, got {self.eval_every}")
        object.__setattr__(self, "freeze", frozenset(self.freeze))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.train]

    def rate(self, step: int) -> float:
        """The learning rate of step `step` (1-based): lr · ½(1 + cos(π (step − 1) / steps)) when annealed."""
        if not self.anneal or self.steps <= 1:
            return self.learning_rate
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / self.steps))

    def schedule(self) -> list[int]:
        """Steps after which the model is evaluated: 0, every `eval_every`, and the last."""
        every = self.eval_every or max(1, math.ceil(self.steps / CURVE_POINTS))
        return sorted({0, self.steps, *range(every, self.steps, every)})


@dataclass(frozen=True)
class CurvePoint:
    """The healed model after `step` steps against the untouched one (the `Evaluator`'s metrics), and the mean
    training loss over the steps since the previous point (None at step 0)."""

    step: int
    kl: float | None
    agreement: float
    perplexity: float | None
    cosine: float | None = None
    loss: float | None = None

    @classmethod
    def of(cls, step: int, m: EvalMetrics, loss: float | None = None) -> CurvePoint:
        return cls(step, m.kl, m.agreement, m.perplexity_after, m.cosine, loss)

    def to_dict(self) -> dict:
        """{"step", "kl", "agreement", "perplexity"} (issue 16); encoders, whose kl is null, add "cosine"."""
        d = {"step": self.step, "kl": self.kl, "agreement": self.agreement, "perplexity": self.perplexity}
        if self.kl is None and self.cosine is not None:
            d["cosine"] = self.cosine
        return d

    @property
    def damage(self) -> float | None:
        """KL for causal LMs, 1 − cosine for encoders (what the research views rank by)."""
        if self.kl is not None:
            return self.kl
        return None if self.cosine is None else max(0.0, 1.0 - self.cosine)


@dataclass
class _Matrix:
    """One matrix of the healed model that differs from the untouched one (or is frozen), in the analysed layout."""

    info: MatrixInfo
    refs: list  # module parameters it feeds (models.contract.ParamRef)
    cut: Cut
    frozen: bool
    a: torch.Tensor | None = None  # factors (rank ≥ 1 truncations and bands): matrix = a @ b
    b: torch.Tensor | None = None
    dense: torch.Tensor | None = None  # otherwise the whole matrix (a replacement, or an uncut frozen matrix)

    @property
    def factorised(self) -> bool:
        return self.a is not None

    def value(self) -> torch.Tensor:
        return self.a @ self.b if self.factorised else self.dense


@dataclass
class HealResult:
    """A finished (or stopped) heal: the configuration, the curve (step 0 = the cut as it stands), timings, and the
    healed tensors (`overrides()` for the `Evaluator`, `save_healed` for a file)."""

    config: HealConfig
    plan: Plan
    curve: list[CurvePoint]
    seconds: float
    train_source: str  # where the training tokens came from, in words
    trainable_params: int
    stopped: bool = False
    steps_per_second: float | None = None
    matrices: list[_Matrix] = field(default_factory=list, repr=False)
    dense: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # trained module parameters
    runnable: object = field(default=None, repr=False)
    workspace: object = field(default=None, repr=False)
    kind: str = "causal_lm"

    @property
    def steps(self) -> int:
        return self.curve[-1].step if self.curve else 0

    @property
    def before(self) -> CurvePoint:
        return self.curve[0]

    @property
    def after(self) -> CurvePoint:
        return self.curve[-1]

    def to_dict(self) -> dict:
        """The `heal` block of `prune --heal` JSON: steps, mode, train, curve, seconds (issue 16)."""
        return {"steps": self.steps, "mode": self.config.mode, "train": self.config.train,
                "curve": [p.to_dict() for p in self.curve], "seconds": self.seconds}

    def overrides(self) -> dict[str, torch.Tensor]:
        """Module parameter name -> healed tensor for everything that differs from the untouched model."""
        return _module_tensors(self.matrices, self.dense, detach=True)

    @property
    def stored_params(self) -> int:
        """Parameters the healed checkpoint stores (tied tensors once, factorised matrices as their factors)."""
        tensors, _ = healed_state(self)
        aliases = {n for group in self.workspace.checkpoint.tied_groups for n in group[1:]}
        return sum(t.numel() for name, t in tensors.items() if name not in aliases)


# ---------------------------------------------------------------------------------------------- training tokens

@dataclass
class TrainingData:
    """Where training batches come from: token segments (causal LMs; a window is `window` consecutive tokens of one
    segment) or padded sentence rows (encoders), and a line saying what they are."""

    source: str
    segments: list[torch.Tensor] = field(default_factory=list)
    window: int = 0
    rows: torch.Tensor | None = None  # encoders: (N, W) padded token ids
    pad: int = 0
    _index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        if self.rows is not None:
            return int((self.rows != self.pad).sum())
        return sum(len(s) for s in self.segments)

    def draw(self, generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(inputs, next-token targets or None) of one training batch, drawn with `generator`."""
        if self.rows is not None:
            chosen = self.rows[torch.randint(len(self.rows), (batch,), generator=generator)]
            width = max(1, int((chosen != self.pad).sum(1).max()))
            return chosen[:, :width].contiguous(), None
        if self._index is None:
            self._index = torch.cat([torch.stack([torch.full((len(s) - self.window + 1,), i),
                                                  torch.arange(len(s) - self.window + 1)], 1)
                                     for i, s in enumerate(self.segments)])
        picks = self._index[torch.randint(len(self._index), (batch,), generator=generator)]
        block = torch.stack([self.segments[int(i)][int(s):int(s) + self.window] for i, s in picks])
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()


def window_starts(n_tokens: int, positions: int, length: int) -> tuple[list[int], int]:
    """(start of every evaluation window, window length) exactly as `spectral.evaluation.windows` places them."""
    length = min(length, n_tokens - 1)
    n = max(1, math.ceil(positions / length))
    span = n_tokens - (length + 1)
    n = min(n, span + 1)
    starts = [round(i * span / max(n - 1, 1)) for i in range(n)] if n > 1 else [0]
    return starts, length


_DATA_CACHE: weakref.WeakKeyDictionary[object, dict[tuple, TrainingData]] = weakref.WeakKeyDictionary()
_DATA_GUARD = threading.Lock()


def training_data(session, config: HealConfig) -> TrainingData:
    """The training split for this session's evaluation batch (module docstring: never a held-out position); made
    once per evaluator (shared by every session on the same checkpoint and text) and batch shape."""
    key = (config.length, config.batch, config.mode, session.spec.key)
    with _DATA_GUARD:
        found = _DATA_CACHE.get(session.evaluator, {}).get(key)
    if found is None:
        found = _training_data(session, config)
        with _DATA_GUARD:
            _DATA_CACHE.setdefault(session.evaluator, {})[key] = found
    return found


def _training_data(session, config: HealConfig) -> TrainingData:
    runnable = session.runnable
    if runnable.kind == "encoder":
        return _encoder_data(session, config)
    if runnable.kind != "causal_lm":
        raise HealError(f"healing needs a language model or a sentence encoder; this model is a {runnable.kind}")
    batch = session.evaluator.batch
    window = min(config.length, runnable.block_size) + 1
    if batch.source == "bundled" and runnable.tokenizer is not None:
        train, held = corpus_text()
        if held.strip() == (runnable.eval_text or "").strip():
            ids = torch.tensor(runnable.tokenizer.encode(train).ids, dtype=torch.long)
            return TrainingData("CPython's pydoc_data.topics before the held-out slice (the demo's training text), "
                                f"{len(ids):,} tokens", [ids], min(window, len(ids)))
    if batch.source in ("text", "bundled"):
        return _text_gaps(session, window)
    rows = sample_batch(runnable, positions=POOL_SEQUENCES * min(window, runnable.block_size),
                        length=min(window, runnable.block_size), seed=session.spec.seed + SAMPLE_SEED_OFFSET)
    ids = rows.input_ids
    return TrainingData(f"{ids.shape[0]} sequences of {ids.shape[1]} tokens sampled from the untouched model "
                        f"(seed {session.spec.seed + SAMPLE_SEED_OFFSET}; the evaluation's are seed "
                        f"{session.spec.seed})", list(ids), ids.shape[1])


def _text_gaps(session, window: int) -> TrainingData:
    """The tokens of the evaluation text that no evaluation window (inputs and targets) touches."""
    runnable, batch = session.runnable, session.evaluator.batch
    text = session.spec.text if batch.source == "text" else runnable.eval_text
    ids = torch.tensor(runnable.tokenizer.encode(text).ids, dtype=torch.long)
    starts, length = window_starts(len(ids), session.spec.positions, min(DEFAULT_SEQUENCE, runnable.block_size))
    rebuilt = torch.stack([ids[s:s + length] for s in starts]) if starts else None
    if rebuilt is None or rebuilt.shape != batch.input_ids.shape or not torch.equal(rebuilt, batch.input_ids):
        raise HealError("cannot tell which tokens of the evaluation text the metrics use, so none is trained on")
    covered = torch.zeros(len(ids), dtype=torch.bool)
    for s in starts:
        covered[s:s + length + 1] = True
    gaps, run = [], None
    for i, c in enumerate(covered.tolist() + [True]):
        if not c and run is None:
            run = i
        elif c and run is not None:
            gaps.append(ids[run:i])
            run = None
    longest = max((len(g) for g in gaps), default=0)
    window = min(window, longest)
    if window < MIN_WINDOW + 1:
        raise HealError(f"the evaluation text leaves no stretch of {MIN_WINDOW + 1} tokens outside the evaluation "
                        "windows to train on; give a longer text or fewer positions")
    gaps = [g for g in gaps if len(g) >= window]
    total = sum(len(g) for g in gaps)
    return TrainingData(f"{total:,} tokens of the {'given' if batch.source == 'text' else 'held-out'} text outside "
                        f"the evaluation windows ({len(gaps)} stretches)", gaps, window)


def _encoder_data(session, config: HealConfig) -> TrainingData:
    """Sentences the evaluation batch did not pick (`sentence_batch` picks DEFAULT_SENTENCES spread evenly)."""
    if config.mode == "lm":
        raise HealError("lm healing needs a causal language model; encoders heal by cosine distillation (distill)")
    runnable, batch = session.runnable, session.evaluator.batch
    pad = runnable.pad_token_id if runnable.pad_token_id is not None else 0
    if batch.source == "random" or runnable.tokenizer is None:
        rows = random_sentence_batch(runnable, sentences=POOL_SENTENCES, seed=session.spec.seed + SAMPLE_SEED_OFFSET)
        return TrainingData(f"{rows.sequences} rows of random token ids (seed "
                            f"{session.spec.seed + SAMPLE_SEED_OFFSET})", rows=rows.input_ids, pad=pad)
    stock = "\n\n".join(topics[k] for k in sorted(topics))
    text = {"text": session.spec.text, "bundled": runnable.eval_text}.get(batch.source, stock)
    found = split_sentences(text)
    n = min(DEFAULT_SENTENCES, len(found))
    held = {found[round(i * (len(found) - 1) / max(n - 1, 1))] for i in range(n)}
    train = [s for s in found if s not in held]
    where = "the evaluation text's sentences the evaluation batch did not pick"
    if len(train) < max(2, config.batch):
        train = [s for s in split_sentences(stock) if s not in held]
        where = "CPython's pydoc_data.topics sentences (the evaluation text has too few left over)"
    if len(train) > POOL_SENTENCES:
        train = [train[round(i * (len(train) - 1) / (POOL_SENTENCES - 1))] for i in range(POOL_SENTENCES)]
    rows = sentence_batch(runnable, "\n\n".join(train), source="heal", sentences=len(train), length=config.length)
    return TrainingData(f"{rows.sequences} sentences: {where}", rows=rows.input_ids, pad=pad)


# ------------------------------------------------------------------------------------------------------ healing

def _replaced(plan: Plan, name: str) -> bool:
    """The plan replaces this matrix outright (rank1 / random / zero: the crystallization study's replacements)."""
    strategy = plan.overrides.get(name, plan.strategy)
    return isinstance(strategy, Strategy) and strategy.name in REPLACEMENT_STRATEGIES


def _factors(workspace, info: MatrixInfo, cut: Cut) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A·B the cut matrix: A = U S^½, B = S^½ Vᵀ over the kept components (fresh tensors)."""
    U, S, Vh = workspace.factors(info.name)
    if cut.kept_rank is not None:
        keep = torch.arange(cut.kept_rank)
    else:
        lo, hi = cut.removed
        keep = torch.cat([torch.arange(lo), torch.arange(hi, S.shape[0])])
    root = S[keep].sqrt()
    return (U[:, keep] * root).contiguous(), (root[:, None] * Vh[keep]).contiguous()


def _module_tensors(matrices: list[_Matrix], dense: Mapping[str, torch.Tensor], *,
                    detach: bool = False) -> dict[str, torch.Tensor]:
    """Module parameter -> tensor: every healed or cut matrix in its module layout, then the trained dense ones."""
    out = {}
    for m in matrices:
        value = m.value()
        if detach:
            value = value.detach()
        stored = to_stored(value, m.info)
        for ref in m.refs:
            out[ref.name] = stored.T if ref.transposed else stored
    for name, t in dense.items():
        out[name] = t.detach() if detach else t
    return out


class Healer:
    """One heal of a session's current cut: the snapshot (taken at construction: later slider moves do not affect
    it), the training data, the trainable tensors and the optimiser; `run` trains and evaluates."""

    def __init__(self, session, config: HealConfig = HealConfig()):
        self.session = session
        self.config = config
        self.runnable = session.runnable
        self.workspace = session.workspace
        self.evaluator = session.evaluator
        self.lock = session.runtime.lock
        self.kind = self.runnable.kind
        self.plan = session.pruner.plan or Plan(Strategy("none"), "all", {})
        precision = sorted({c.precision for c in self.plan.cuts.values()} - {"fp32"})
        if precision:
            raise HealError(f"healing trains in float32 and this cut stores {', '.join(precision)}: heal an fp32 cut "
                            "(quantise after healing)")
        unknown = [n for n in config.freeze if n not in {m.name for m in self.workspace.matrices}
                   and not any(n in m.tied_with for m in self.workspace.matrices)]
        if unknown:
            raise HealError(f"freeze names {unknown[0]!r}, which is not a weight matrix of this checkpoint")
        freeze = {self.workspace.info(n).name for n in config.freeze}
        self.matrices: list[_Matrix] = []
        owned: set[str] = set()
        for info in self.workspace.matrices:
            cut = self.plan.cut(info.name)
            frozen = info.name in freeze or (not cut.is_identity and _replaced(self.plan, info.name))
            if cut.is_identity and not frozen:
                continue
            refs = self.runnable.params_for([info.name, *info.tied_with])
            if not refs:
                continue  # the model never reads it
            owned.update(r.name for r in refs)
            m = _Matrix(info, refs, cut, frozen)
            if cut.needs_factors:
                m.a, m.b = _factors(self.workspace, info, cut)
            else:  # a replacement (the working buffer) or an uncut frozen matrix (the original), copied now
                m.dense = session.pruner.matrix(info.name).detach().clone()
            self.matrices.append(m)
        self.leaves: list[torch.Tensor] = []
        train = config.train
        for m in self.matrices:
            trains = train == "all" or (not m.frozen and train in ("factors", "unfrozen"))
            if not trains:
                continue
            if m.factorised:
                self.leaves += [m.a.requires_grad_(True), m.b.requires_grad_(True)]
            elif train == "all" and m.cut.random_seed is not None:
                self.leaves.append(m.dense.requires_grad_(True))
        self.dense: dict[str, torch.Tensor] = {}
        if train in ("unfrozen", "all"):
            for name, p in self.runnable.module.named_parameters():
                if name not in owned:
                    self.dense[name] = p.detach().clone().requires_grad_(True)
                    self.leaves.append(self.dense[name])
        if config.steps and not self.leaves:
            hint = ("; --heal-train unfrozen heals the rest of the model around frozen replacements"
                    if train == "factors" else "")
            raise HealError(f"nothing to train: the cut has no {'unfrozen low-rank factors' if train == 'factors' else 'unfrozen parameters'}{hint}")
        with self.lock:  # sampling runs the shared model, which a heal in another thread may have tensors swapped into
            self.data = training_data(session, config)
        self.trainable_params = sum(t.numel() for t in self.leaves)

    # ------------------------------------------------------------------------------------------------ one step

    def _start_stage(self, params: Mapping[str, torch.Tensor]) -> int:
        """The first stage that reads a replaced parameter: the stages before it are the untouched model's."""
        changed = set(params)
        return next((i for i, stage in enumerate(self.runnable.stages) if stage.params & changed),
                    len(self.runnable.stages))

    def _outputs(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor,
                 teacher: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(student outputs with gradients, teacher outputs or None). Staged models run stage by stage, as the
        evaluator does (the same per-submodule swap locks), sharing the untouched prefix with the teacher;
        others through one functional call on the whole module."""
        stages = self.runnable.stages
        if not stages:
            reference = None
            if teacher:
                with torch.no_grad():
                    reference = locked_functional_call(self.runnable.module, {}, (inputs,), tie_weights=True)
            return locked_functional_call(self.runnable.module, params, (inputs,), tie_weights=True), reference
        start = self._start_stage(params)
        with torch.no_grad():
            x = inputs
            for stage in stages[:start]:
                x = stage.run({}, x)
            reference = None
            if teacher:
                reference = x
                for stage in stages[start:]:
                    reference = stage.run({}, reference)
        for stage in stages[start:]:
            x = stage.run(params, x)
        return x, reference

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """The training loss of one batch (module docstring), with gradients to the trainable tensors."""
        if inputs.is_inference():  # e.g. a batch sampled under inference mode: autograd cannot save those
            inputs = inputs.clone()
        params = _module_tensors(self.matrices, self.dense)
        student, teacher = self._outputs(params, inputs, teacher=self.config.mode == "distill")
        if self.kind == "encoder":
            return 1.0 - F.cosine_similarity(student, teacher, dim=-1).mean()
        logits = student.reshape(-1, student.shape[-1]).float()
        if self.config.mode == "lm":
            return F.cross_entropy(logits, targets.reshape(-1))
        reference = torch.log_softmax(teacher.reshape(-1, teacher.shape[-1]).float(), dim=-1)
        return F.kl_div(torch.log_softmax(logits, dim=-1), reference, reduction="batchmean", log_target=True)

    def evaluate(self) -> EvalMetrics:
        """The healed model now, on the evaluation batch, by the session's `Evaluator` (the Pruning page's)."""
        with self.lock:
            return self.evaluator.evaluate(_module_tensors(self.matrices, self.dense, detach=True))

    # --------------------------------------------------------------------------------------------------- run

    def run(self, *, on_point: Callable[[CurvePoint], None] | None = None, progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> HealResult:
        """Train `config.steps` steps (or until `should_stop()`), evaluating on the schedule; `on_point` gets each
        curve point as it is made, `progress(step, steps, "heal")` each step."""
        config = self.config
        t0 = time.perf_counter()
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.Adam(self.leaves, lr=config.learning_rate) if self.leaves else None
        schedule = set(config.schedule())
        curve = [CurvePoint.of(0, self.evaluate())]
        if on_point:
            on_point(curve[0])
        losses: list[float] = []
        train_seconds, step, stopped = 0.0, 0, False
        for step in range(1, config.steps + 1):
            if should_stop is not None and should_stop():
                step, stopped = step - 1, True
                break
            ts = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.rate(step)
            inputs, targets = self.data.draw(generator, config.batch)
            with self.lock:
                loss = self.loss(inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.leaves, CLIP_NORM)
            optimizer.step()
            losses.append(float(loss.detach()))
            train_seconds += time.perf_counter() - ts
            if progress:
                progress(step, config.steps, "heal")
            if step in schedule:
                curve.append(CurvePoint.of(step, self.evaluate(), sum(losses) / len(losses)))
                losses = []
                if on_point:
                    on_point(curve[-1])
        if curve[-1].step != step:
            curve.append(CurvePoint.of(step, self.evaluate(), sum(losses) / len(losses) if losses else None))
            if on_point:
                on_point(curve[-1])
        for t in self.leaves:
            t.requires_grad_(False)
        return HealResult(config, self.plan, curve, time.perf_counter() - t0, self.data.source,
                          self.trainable_params, stopped, step / train_seconds if train_seconds > 0 else None,
                          self.matrices, self.dense, self.runnable, self.workspace, self.kind)


def heal(session, config: HealConfig = HealConfig(), *, on_point: Callable[[CurvePoint], None] | None = None,
         progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> HealResult:
    """Heal the session's current cut (`Healer`); the session, its runtime and the shared model are left as they are."""
    return Healer(session, config).run(on_point=on_point, progress=progress, should_stop=should_stop)


class HealJob:
    """A heal in a background thread (the dashboard's Heal control): the snapshot is taken when the job is made,
    `curve` grows while it runs, `stop()` ends it after the current step (with a last evaluation)."""

    def __init__(self, session, config: HealConfig, label: str = ""):
        self.healer = Healer(session, config)
        self.config = config
        self.label = label
        self.curve: list[CurvePoint] = []
        self.step = 0
        self.result: HealResult | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="heal", daemon=True)

    def start(self) -> HealJob:
        self._thread.start()
        return self

    def _work(self) -> None:
        def progress(i: int, total: int, label: str) -> None:
            self.step = i

        try:
            self.result = self.healer.run(on_point=self.curve.append, progress=progress, should_stop=self._stop.is_set)
        except Exception as exc:  # noqa: BLE001 - reported in place by the page, never a dead thread with no word
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> HealResult | None:
        self._thread.join(timeout)
        return self.result


# ------------------------------------------------------------------------------------------------------- saving

def _factor_tensors(m: _Matrix) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(factor_a, factor_b) in the stored layout (stored = a @ b), or None when the matrix is better stored dense:
    factors no smaller than the matrix, or a layout that is not a plain (transposed) 2-D matrix."""
    rows, cols = m.info.shape
    k = m.a.shape[1]
    if k * (rows + cols) >= rows * cols or len(m.info.source_shape or (rows, cols)) != 2:
        return None
    a, b = m.a.detach(), m.b.detach()
    return (b.T.contiguous(), a.T.contiguous()) if m.info.transposed else (a.contiguous(), b.contiguous())


def healed_state(result: HealResult) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the healed checkpoint: factorised matrices as NAME.factor_a / NAME.factor_b (the
    cut's storage, `LOADER_NOTE`), zeros as rank-0 factors, trained tensors float32, the rest as in the checkpoint."""
    ckpt = result.workspace.checkpoint
    tensors: dict[str, torch.Tensor] = {}
    factorised: dict[str, dict] = {}
    written: set[str] = set()
    for m in result.matrices:
        names = (m.info.name, *m.info.tied_with)
        written.update(names)
        if m.factorised and (pair := _factor_tensors(m)) is not None:
            a, b = pair
        elif m.cut.kept_rank == 0:
            rows, cols = (m.info.source_shape or m.info.shape)[:2]
            a, b = torch.zeros(rows, 0), torch.zeros(0, cols)
        else:
            stored = to_stored(m.value().detach(), m.info).contiguous()
            for name in names:
                tensors[name] = stored.clone()
            continue
        tensors[m.info.name + FACTOR_A], tensors[m.info.name + FACTOR_B] = a, b
        factorised[m.info.name] = {"a": m.info.name + FACTOR_A, "b": m.info.name + FACTOR_B,
                                   "shape": list(ckpt.shapes[m.info.name]), "rank": int(a.shape[1]),
                                   "dtype": "float32", "tied_with": list(m.info.tied_with)}
    trained = {}
    for stored_name, refs in result.runnable.param_names.items():
        if refs and refs[0].name in result.dense and stored_name not in written:
            value = result.dense[refs[0].name].detach()
            trained[stored_name] = (value.T if refs[0].transposed else value).contiguous().clone()
    for name in ckpt.names():
        if name in written:
            continue
        tensors[name] = trained[name] if name in trained else ckpt.tensor(name).contiguous()
    meta = _metadata(result)
    meta["spectra_factorised"] = json.dumps(factorised)
    return tensors, meta


def _metadata(result: HealResult) -> dict[str, str]:
    """The cut file's metadata (spectral/pruning.py `pruned_metadata`) plus the heal and the loader note."""
    meta = pruned_metadata(_PrunerView(result.workspace, result.runnable), result.plan)
    meta["spectra_heal"] = json.dumps({**result.to_dict(), "lr": result.config.learning_rate,
                                       "seed": result.config.seed, "batch": result.config.batch,
                                       "freeze": sorted(result.config.freeze), "train_source": result.train_source})
    meta["spectra_loader_note"] = LOADER_NOTE
    return meta


@dataclass
class _PrunerView:
    """What `pruned_metadata` reads of a pruner: the workspace, the runnable and the plan."""

    workspace: object
    runnable: object
    plan: Plan | None = None


def save_healed(result: HealResult, path: str | Path | None = None) -> bytes | None:
    """Write the healed checkpoint (safetensors, `healed_state`) to `path`, or return its bytes (the download)."""
    tensors, meta = healed_state(result)
    if path is None:
        return save(tensors, metadata=meta)
    save_file(tensors, str(path), metadata=meta)
    return None


def densify(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The dense checkpoint of a healed file's tensors: NAME = factor_a @ factor_b, tied names copied (`LOADER_NOTE`)."""
    entries = json.loads(metadata.get("spectra_factorised", "{}"))
    out = dict(tensors)
    for name, entry in entries.items():
        a, b = out.pop(entry["a"]), out.pop(entry["b"])
        dense = (a.to(torch.float32) @ b.to(torch.float32)).reshape(entry["shape"]).contiguous()
        for alias in (name, *entry.get("tied_with", [])):
            out[alias] = dense.clone()
    return out


def densify_file(source: str | Path, target: str | Path) -> None:
    """Read a healed safetensors file and write its dense equivalent (metadata kept, factorisation entry removed)."""
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    dense = densify(tensors, metadata)
    metadata.pop("spectra_factorised", None)
    metadata.pop("spectra_loader_note", None)
    save_file(dense, str(target), metadata=metadata)

