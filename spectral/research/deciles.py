"""Small singular values (Staats, Thamm & Rosenow, arXiv 2410.17770; ../shared/papers 004): decile ablation.

Each matrix's singular values, sorted descending, are cut into ten deciles (decile d holds indices
[d·r/10, (d+1)·r/10) of r = min(m, n); d = 0 the largest tenth: `spectral.pruning.band_bounds`). For one matrix type at
a time, decile d is removed from every matrix of that type at once (all blocks), W' = W − Σ_{i∈d} s_i u_i v_iᵀ, and
the model's outputs are compared with the untouched model: ΔKL (= KL(original ‖ modified), the untouched model's KL
being 0) and Δperplexity. The paper finds that for rectangular matrices the smallest decile can matter more than
several larger ones.

Matrix types: the role (attn_qkv, attn_out, mlp_up, ...) for matrices inside numbered blocks; matrices outside
blocks (embeddings, heads) are their own type, named by their module path (tok_emb, pos_emb), so a tied embedding
is not pooled with the position embedding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from spectral.matrices import module_path
from spectral.pruning import Cut, Plan, Strategy, band_bounds
from spectral.research.common import Outcome, Progress, ResearchError, _json
from spectral.research.context import ResearchContext

DECILES = 10
_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def matrix_type(info) -> str:
    """The role inside numbered blocks, else the module path (e.g. 'tok_emb')."""
    if _LAYER.search(info.name):
        return info.role
    return module_path(info.name)


def type_groups(workspace) -> dict[str, list]:
    """Matrix type -> MatrixInfos, in checkpoint order."""
    groups: dict[str, list] = {}
    for info in workspace.matrices:
        groups.setdefault(matrix_type(info), []).append(info)
    return groups


@dataclass
class DecileRow:
    type: str
    role: str
    matrices: list[str]
    outcomes: list[Outcome]  # ten, decile 0 (largest singular values) first
    energy_share: list[float]  # fraction of the type's Σs² in each decile

    def to_dict(self) -> dict:
        kl = [o.kl for o in self.outcomes]
        return {"type": self.type, "role": self.role, "matrices": self.matrices,
                "delta_kl": [_json(v) for v in kl] if all(v is not None for v in kl) else None,
                "delta_perplexity": [_json(o.delta_perplexity) for o in self.outcomes],
                "agreement": [_json(o.agreement) for o in self.outcomes],
                "cosine": [_json(o.cosine) for o in self.outcomes] if self.outcomes[0].cosine is not None else None,
                "energy_share": [_json(v) for v in self.energy_share],
                "rank_by_damage": [int(i) for i in np.argsort([-(o.damage or 0.0) for o in self.outcomes],
                                                               kind="stable")]}


@dataclass
class DecilesResult:
    header: dict
    rows: list[DecileRow]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.header, "deciles": [f"D{d + 1}" for d in range(DECILES)],
                "order": "decile 1 = the largest tenth of each matrix's singular values",
                "rows": [r.to_dict() for r in self.rows], "notes": self.notes}


def deciles(ctx: ResearchContext, *, types: list[str] | None = None, progress: Progress | None = None
            ) -> DecilesResult:
    """The decile-ablation table: one row per matrix type, ten outcomes each."""
    ctx.require_forward("deciles")
    groups = type_groups(ctx.workspace)
    if types is not None:
        unknown = [t for t in types if t not in groups]
        if unknown:
            raise ResearchError(f"unknown matrix type {unknown[0]!r}; types here: {', '.join(groups)}")
        groups = {t: groups[t] for t in types}
    spectra = ctx.workspace.spectra()
    notes = []
    unused = [i.name for infos in groups.values() for i in infos if not ctx.used(i.name)]
    if unused:
        notes.append(f"not read by the model's forward pass, left out: {', '.join(unused)}")
    groups = {t: [i for i in infos if i.name in spectra and ctx.used(i.name)] for t, infos in groups.items()}
    groups = {t: infos for t, infos in groups.items() if infos}
    rows = []
    total = len(groups) * DECILES
    for g, (name, infos) in enumerate(groups.items()):
        outcomes, shares = [], []
        energy_total = sum(float((spectra[i.name].singular_values ** 2).sum()) for i in infos)
        for d in range(DECILES):
            if progress:
                progress(g * DECILES + d, total, f"{name} decile {d + 1}")
            cuts, removed = {}, 0.0
            for info in infos:
                r = min(info.shape)
                lo, hi = band_bounds(d, r)
                if hi > lo:
                    cuts[info.name] = Cut(removed=(lo, hi))
                    removed += float((spectra[info.name].singular_values[lo:hi] ** 2).sum())
            shares.append(removed / energy_total if energy_total > 0 else 0.0)
            if not cuts:
                outcomes.append(_unchanged(ctx))
                continue
            _, outcome = ctx.run_plan(Plan(Strategy("band", d), "all", cuts))
            outcomes.append(outcome)
        rows.append(DecileRow(name, infos[0].role, [i.name for i in infos], outcomes, shares))
    if progress:
        progress(total, total, "")
    return DecilesResult(ctx.header("deciles"), rows, notes)


def _unchanged(ctx: ResearchContext) -> Outcome:
    before = ctx.evaluator.perplexity_before
    return Outcome(1.0, 0.0, None, before, before) if ctx.metric == "kl" else Outcome(1.0, None, 1.0)
