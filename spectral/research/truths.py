"""Two truths (PhotonicGPT study, ../shared/papers 000): MP signal % against energy utilisation, per matrix type.

The study's paradox: the MP z-score calls most singular values noise (a few % "signal"), yet the energy (variance)
rank says every layer uses 88-99% of its capacity, and pruning by the MP rule destroys the model while 99.9% energy
keeps it. This view puts both readings side by side for any model:

- per role: MP signal SVs / full rank (signal %), energy rank / full rank (utilisation %), and the parameters each
  view calls "prunable": dense parameters minus what a rank-k factorisation at k = n_signal (MP) or k = energy_rank
  (energy) would store, k·(m+n) capped at m·n (DESIGN.md `summary`);
- the agreement, KL and perplexity that each pruning rule actually gives when applied to every matrix (the study's
  table 2.2: MP z > t_c, energy 99.9/99.5/99/98 %, fp16, plus the Gavish-Donoho threshold).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from spectral.analysis import Settings, factorised_params, role_table
from spectral.pruning import Strategy, make_plan
from spectral.research.common import Outcome, Progress, _json
from spectral.research.context import ResearchContext
from spectral.tracy_widom import tw1_ppf

ENERGY_LEVELS = (0.999, 0.995, 0.99, 0.98)  # the study's table 2.2


def default_rules(settings: Settings) -> list[tuple[str, Strategy]]:
    """(label, strategy) of the pruning rules compared: the study's table plus Gavish-Donoho."""
    t = float(tw1_ppf(settings.confidence))
    rules = [(f"MP z > {t:.2f}", Strategy("mp", t)), ("Gavish-Donoho", Strategy("optimal"))]
    rules += [(f"energy {100 * p:g}%", Strategy("energy", p)) for p in ENERGY_LEVELS]
    rules.append(("fp16", Strategy("none", None, "fp16")))
    return rules


@dataclass
class RuleResult:
    label: str
    strategy: str
    value: float | None
    precision: str
    params_after: int
    compression: float
    outcome: Outcome | None  # None without a forward pass

    def to_dict(self) -> dict:
        d = {"label": self.label, "strategy": self.strategy, "value": self.value, "precision": self.precision,
             "params_after": self.params_after, "compression": _json(self.compression)}
        d.update(self.outcome.to_dict() if self.outcome is not None else
                 {"kl": None, "agreement": None, "cosine": None, "perplexity_after": None, "delta_perplexity": None})
        return d


@dataclass
class TruthsResult:
    header: dict
    settings: Settings
    roles: list[dict]
    totals: dict
    rules: list[RuleResult]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.header, "settings": {"estimator": self.settings.estimator,
                                            "confidence": self.settings.confidence, "energy": self.settings.energy},
                "roles": self.roles, "totals": self.totals, "rules": [r.to_dict() for r in self.rules],
                "notes": self.notes}


def truths(ctx: ResearchContext, settings: Settings | None = None, *, rules: list[tuple[str, Strategy]] | None = None,
           progress: Progress | None = None) -> TruthsResult:
    """Both readings of every matrix type, and what each pruning rule does to the model's outputs."""
    settings = settings or Settings()
    analysis = ctx.workspace.analyze(settings, progress=progress)
    by_role: dict[str, list] = {}
    for r in analysis.matrices:
        by_role.setdefault(r.role, []).append(r)
    roles = []
    for row in role_table(analysis):
        reps = by_role[row["role"]]
        dense = sum(r.shape[0] * r.shape[1] for r in reps)
        kept_mp = sum(factorised_params(tuple(r.shape), r.n_signal) for r in reps)
        kept_energy = sum(factorised_params(tuple(r.shape), r.energy_rank) for r in reps)
        roles.append({**row, "signal_pct": _json(row["signal_pct"]), "utilization_pct": _json(row["utilization_pct"]),
                      "params": dense, "prunable_mp": dense - kept_mp, "prunable_energy": dense - kept_energy,
                      "prunable_mp_pct": 100.0 * (dense - kept_mp) / dense if dense else None,
                      "prunable_energy_pct": 100.0 * (dense - kept_energy) / dense if dense else None})
    s = analysis.summary
    totals = {"matrix_params": s["matrix_params"], "n_params": ctx.workspace.checkpoint.n_params,
              "prunable_mp": s["matrix_params"] - s["params_kept_mp"],
              "prunable_energy": s["matrix_params"] - s["params_kept_energy"],
              "prunable_mp_pct": 100.0 * (s["matrix_params"] - s["params_kept_mp"]) / max(s["matrix_params"], 1),
              "prunable_energy_pct": 100.0 * (s["matrix_params"] - s["params_kept_energy"])
              / max(s["matrix_params"], 1),
              "signal_pct": 100.0 * sum(r.n_signal for r in analysis.matrices)
              / max(sum(r.rank for r in analysis.matrices), 1),
              "utilization_pct": 100.0 * sum(r.energy_rank for r in analysis.matrices)
              / max(sum(r.rank for r in analysis.matrices), 1)}
    notes = []
    results = []
    rules = rules if rules is not None else default_rules(settings)
    if not ctx.runs:
        notes.append(f"no forward pass ({ctx.why_not}): the rules' agreement and KL are not measured")
    for i, (label, strategy) in enumerate(rules):
        if progress:
            progress(i, len(rules), label)
        if ctx.runs:
            plan = make_plan(ctx.workspace, strategy, settings=settings)
            prune, outcome = ctx.run_plan(plan)
            results.append(RuleResult(label, strategy.name, strategy.value, strategy.precision, prune.params_after,
                                      prune.compression, outcome))
        else:
            results.append(RuleResult(label, strategy.name, strategy.value, strategy.precision, 0, float("nan"), None))
    if progress:
        progress(len(rules), len(rules), "")
    header = ctx.header("truths")
    return TruthsResult(header, settings, roles, totals, results, notes)
