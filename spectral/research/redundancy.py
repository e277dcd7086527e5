"""Crystallization / redundancy (PhotonicGPT "Per-layer crystallization test", ../shared/papers 003).

The study replaced one projection by its rank-1 part or by random values and found the converged loss unchanged
(after fine-tuning): the matrix was redundant, not low-dimensional (its participation ratio was high). This view
asks the no-fine-tuning version for every matrix: the KL (1 − cosine for encoders) when it alone is replaced by

- `rank1`: its best rank-1 approximation s₁u₁v₁ᵀ,
- `random`: Gaussian noise of the same Frobenius norm (seeded per matrix),
- `zero`: zeros,

beside the participation ratio PR = (Σs²)²/Σs⁴ and the top-component share s₁²/Σs² (the study's "PC1 %").

Ranking, decided here: a matrix is as redundant as its cheapest replacement is harmless, so matrices are sorted by
`kl_best` = min(kl_rank1, kl_random, kl_zero) ascending (most redundant first); `best` names that replacement.
Encoders have no KL (`kl_*` null): `cosine_*` hold the embedding cosines and `damage_*` = 1 − cosine rank them
(`damage_*` equals `kl_*` for language models). Without a forward pass the damage columns are null and the sort falls
back to the top-component share, descending. Matrices the model never reads (e.g. a BERT pooler under a sentence
head) are left out with a note.

With `heal` (a `spectral.heal.HealConfig`; `redundancy --heal STEPS`), the study's own protocol follows each
replacement: the replaced matrix is frozen and the rest of the model heals for `steps` steps ("unfrozen"); in lm mode
(the study's fine-tuning) a control freezes the matrix at its trained values ("trained"), which distillation need not
run (the untouched model is its own optimum, KL 0). Rows gain `healed_*` columns (what remains after healing) and a
`heal` block per replacement (spectral/heal.py `HealResult.to_dict`), and are ranked by `healed_score_best`: the
perplexity after lm healing on labelled text (the study compares converged losses), else the damage after healing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from spectral.heal import CurvePoint, HealConfig, HealResult, heal
from spectral.metrics import participation_ratio
from spectral.pruning import Cut, Plan, Strategy
from spectral.research.common import Outcome, Progress, _json
from spectral.research.context import ResearchContext

REPLACEMENTS = ("rank1", "random", "zero")
CONTROL = "trained"  # healed with the matrix frozen at its trained values (lm mode only)


def top_share(singular_values) -> float:
    """s₁² / Σ s²: the energy share of the top component (0 for the zero matrix)."""
    e = np.asarray(singular_values, dtype=np.float64) ** 2
    total = float(e.sum())
    return float(e.max() / total) if total > 0 else 0.0


@dataclass
class RedundancyRow:
    name: str
    role: str
    shape: list[int]
    participation_ratio: float
    top_share: float
    outcomes: dict[str, Outcome] | None
    healed: dict[str, HealResult] | None = None  # replacement (and the control) -> the heal that followed it

    def damage(self, replacement: str) -> float | None:
        """KL for causal LMs, 1 − cosine for encoders (`Outcome.damage`)."""
        return None if self.outcomes is None else self.outcomes[replacement].damage

    @property
    def best(self) -> str | None:
        if self.outcomes is None:
            return None
        return min(REPLACEMENTS, key=lambda r: (self.damage(r) if self.damage(r) is not None else float("inf")))

    @property
    def damage_best(self) -> float | None:
        return None if self.best is None else self.damage(self.best)

    def healed_point(self, replacement: str) -> CurvePoint | None:
        """The model after healing around this replacement (None: not healed)."""
        found = (self.healed or {}).get(replacement)
        return None if found is None else found.after

    @property
    def healed_metric(self) -> str:
        """What healed replacements are compared by: perplexity after lm healing on labelled text (the study's
        converged loss), else the damage (KL, 1 − cosine) against the untouched model."""
        found = next(iter((self.healed or {}).values()), None)
        if found is not None and found.config.mode == "lm" and found.after.perplexity is not None:
            return "perplexity"
        return "damage"

    def healed_score(self, replacement: str) -> float | None:
        p = self.healed_point(replacement)
        return None if p is None else (p.perplexity if self.healed_metric == "perplexity" else p.damage)

    @property
    def healed_best(self) -> str | None:
        scores = {r: v for r in REPLACEMENTS if (v := self.healed_score(r)) is not None}
        return min(scores, key=scores.get) if scores else None

    @property
    def healed_damage_best(self) -> float | None:
        return None if self.healed_best is None else self.healed_point(self.healed_best).damage

    @property
    def healed_score_best(self) -> float | None:
        return None if self.healed_best is None else self.healed_score(self.healed_best)

    def to_dict(self) -> dict:
        d = {"name": self.name, "role": self.role, "shape": self.shape,
             "participation_ratio": _json(self.participation_ratio), "top_share": _json(self.top_share),
             "participation_ratio_pct": _json(100.0 * self.participation_ratio / min(self.shape))}
        o = self.outcomes or {}
        for r in REPLACEMENTS:
            d[f"kl_{r}"] = _json(o[r].kl) if r in o else None
        for r in REPLACEMENTS:
            d[f"cosine_{r}"] = _json(o[r].cosine) if r in o else None
            d[f"damage_{r}"] = _json(self.damage(r))
            d[f"agreement_{r}"] = _json(o[r].agreement) if r in o else None
            d[f"delta_perplexity_{r}"] = _json(o[r].delta_perplexity) if r in o else None
        best = o.get(self.best) if self.best else None
        d["kl_best"] = _json(best.kl) if best is not None else None
        d["damage_best"] = _json(self.damage_best)
        d["best"] = self.best
        if self.healed is not None:
            for r in (*REPLACEMENTS, CONTROL):
                p = self.healed_point(r)
                d[f"healed_kl_{r}"] = _json(p.kl) if p else None
                d[f"healed_cosine_{r}"] = _json(p.cosine) if p else None
                d[f"healed_damage_{r}"] = _json(p.damage) if p else None
                d[f"healed_agreement_{r}"] = _json(p.agreement) if p else None
                d[f"healed_perplexity_{r}"] = _json(p.perplexity) if p else None
            d["healed_best"] = self.healed_best
            d["healed_damage_best"] = _json(self.healed_damage_best)
            d["healed_metric"] = self.healed_metric
            d["healed_score_best"] = _json(self.healed_score_best)
            d["heal"] = {r: h.to_dict() for r, h in self.healed.items()}
        return d


@dataclass
class RedundancyResult:
    header: dict
    rows: list[RedundancyRow]  # most redundant first
    notes: list[str] = field(default_factory=list)

    heal: HealConfig | None = None
    heal_seconds: float = 0.0

    def to_dict(self) -> dict:
        if self.heal is not None:
            sort = ("healed_score_best (what remains after healing around the frozen replacement: perplexity after lm "
                    "healing on labelled text, else KL or 1 - cosine) ascending: most redundant first")
        elif self.header.get("metric"):
            sort = "damage_best (KL, or 1 - cosine for encoders) ascending: most redundant first"
        else:
            sort = "top_share descending (no forward pass)"
        d = {**self.header, "replacements": list(REPLACEMENTS), "sort": sort,
             "rows": [r.to_dict() for r in self.rows], "notes": self.notes}
        if self.heal is not None:
            d["heal"] = {"steps": self.heal.steps, "mode": self.heal.mode, "train": self.heal.train,
                         "lr": self.heal.learning_rate, "seconds": self.heal_seconds}
        return d


def redundancy(ctx: ResearchContext, *, names: list[str] | None = None, seed: int = 0,
               progress: Progress | None = None, heal_config: HealConfig | None = None) -> RedundancyResult:
    """Replace each matrix alone by rank-1, random and zeros; rank the matrices from most to least redundant. With
    `heal_config`, each replacement is frozen and the rest of the model heals (the crystallization protocol)."""
    ws = ctx.workspace
    spectra = ws.spectra(progress)
    wanted = [ws.info(n).name for n in names] if names is not None else [m.name for m in ws.matrices]
    wanted = [n for n in wanted if n in spectra]
    notes = []
    unused = [n for n in wanted if not ctx.used(n)]
    if unused:
        notes.append(f"not read by the model's forward pass, left out: {', '.join(unused)}")
        wanted = [n for n in wanted if n not in unused]
    if not ctx.runs:
        notes.append(f"no forward pass ({ctx.why_not}): the replacement KLs are not measured")
        if heal_config is not None:
            ctx.require_forward("healed redundancy")
    healing = heal_config is not None and ctx.runs
    if healing:
        heal_config = replace(heal_config, train="unfrozen")
        notes.append(f"healed: each replacement frozen, the rest trained {heal_config.steps} steps "
                     f"({heal_config.mode}, lr {heal_config.learning_rate:g})"
                     + ("" if heal_config.mode == "lm" else "; the 'trained' control is not run in distill mode "
                        "(the untouched model is its own optimum)"))
    controls = (CONTROL,) if healing and heal_config.mode == "lm" else ()
    heal_seconds = 0.0
    rows = []
    per = len(REPLACEMENTS) + len(controls)
    total = len(wanted) * per
    for i, name in enumerate(wanted):
        info = ws.info(name)
        s = spectra[name].singular_values
        outcomes = None
        healed: dict[str, HealResult] | None = {} if healing else None
        if ctx.runs:
            outcomes = {}
            for j, r in enumerate(REPLACEMENTS):
                if progress:
                    progress(i * per + j, total, f"{name} {r}")
                cut = {"rank1": Cut(kept_rank=min(1, min(info.shape))), "random": Cut(random_seed=seed),
                       "zero": Cut(kept_rank=0)}[r]
                if r == "rank1" and min(info.shape) <= 1:
                    cut = None
                if cut is None:
                    before = ctx.evaluator.perplexity_before
                    outcomes[r] = Outcome(1.0, 0.0, None, before, before) if ctx.metric == "kl" else \
                        Outcome(1.0, None, 1.0)
                    continue
                strategy = Strategy(r, seed if r == "random" else None)
                _, outcomes[r] = ctx.run_plan(Plan(strategy, "all", {name: cut}))
                if healing:
                    healed[r] = heal(ctx.session, replace(heal_config, freeze=frozenset({name})))
                    heal_seconds += healed[r].seconds
            for j, r in enumerate(controls):
                if progress:
                    progress(i * per + len(REPLACEMENTS) + j, total, f"{name} {r}")
                ctx.run_plan(Plan(Strategy("none"), "all", {}))
                healed[r] = heal(ctx.session, replace(heal_config, freeze=frozenset({name})))
                heal_seconds += healed[r].seconds
        rows.append(RedundancyRow(name, info.role, list(info.shape), float(participation_ratio(s)), top_share(s),
                                  outcomes, healed))
    if progress:
        progress(total, total, "")
    if healing:
        rows.sort(key=lambda r: (r.healed_score_best if r.healed_score_best is not None else float("inf"), r.name))
    elif ctx.runs:
        rows.sort(key=lambda r: (r.damage_best if r.damage_best is not None else float("inf"), r.name))
    else:
        rows.sort(key=lambda r: (-r.top_share, r.name))
    return RedundancyResult(ctx.header("redundancy"), rows, notes, heal_config if healing else None, heal_seconds)
