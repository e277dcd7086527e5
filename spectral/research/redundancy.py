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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spectral.metrics import participation_ratio
from spectral.pruning import Cut, Plan, Strategy
from spectral.research.common import Outcome, Progress, _json
from spectral.research.context import ResearchContext

REPLACEMENTS = ("rank1", "random", "zero")


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
        return d


@dataclass
class RedundancyResult:
    header: dict
    rows: list[RedundancyRow]  # most redundant first
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.header, "replacements": list(REPLACEMENTS),
                "sort": "damage_best (KL, or 1 - cosine for encoders) ascending: most redundant first"
                        if self.header.get("metric") else "top_share descending (no forward pass)",
                "rows": [r.to_dict() for r in self.rows], "notes": self.notes}


def redundancy(ctx: ResearchContext, *, names: list[str] | None = None, seed: int = 0,
               progress: Progress | None = None) -> RedundancyResult:
    """Replace each matrix alone by rank-1, random and zeros; rank the matrices from most to least redundant."""
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
    rows = []
    total = len(wanted) * len(REPLACEMENTS)
    for i, name in enumerate(wanted):
        info = ws.info(name)
        s = spectra[name].singular_values
        outcomes = None
        if ctx.runs:
            outcomes = {}
            for j, r in enumerate(REPLACEMENTS):
                if progress:
                    progress(i * len(REPLACEMENTS) + j, total, f"{name} {r}")
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
        rows.append(RedundancyRow(name, info.role, list(info.shape), float(participation_ratio(s)), top_share(s),
                                  outcomes))
    if progress:
        progress(total, total, "")
    if ctx.runs:
        rows.sort(key=lambda r: (r.damage_best if r.damage_best is not None else float("inf"), r.name))
    else:
        rows.sort(key=lambda r: (-r.top_share, r.name))
    return RedundancyResult(ctx.header("redundancy"), rows, notes)
